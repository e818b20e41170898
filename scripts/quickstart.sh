#!/usr/bin/env bash
# make quickstart: train a small teacher honestly on Python's own documentation text (pydoc_data,
# shipped with CPython; nothing is downloaded), distill it with examples/quickstart-cpu.yaml
# (two stages, then QAT and INT8), and print a teacher-vs-student table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
KDISTILL=${KDISTILL:-.venv/bin/kdistill}
export KDISTILL_PVC_ROOT=${KDISTILL_PVC_ROOT:-./pvc}
# Small models on a shared 2-core machine: one intra-op thread was 2-3x faster per step than two
# when other processes load the CPU (two threads spin-wait on each other); override to taste.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${QUICKSTART_OUT:-./kdistill-out/quickstart}
TEACHER_STEPS=${TEACHER_STEPS:-300}

# On a terminal every training step shows a progress bar per stage; elsewhere (CI, a pipe, a
# file) the JSON progress lines are thinned to checkpoints, evaluations and every 10th step.
ON_TERMINAL=0
if [ -t 1 ] && [ -t 2 ]; then ON_TERMINAL=1; fi

started=$(date +%s)
echo "== 1/4 corpus, tokenizer and teacher (pydoc text -> $KDISTILL_PVC_ROOT)"
if [ "$ON_TERMINAL" = 1 ]; then
    "$PY" -P -m kdistill.trainer.teacher_pretrain --pvc "$KDISTILL_PVC_ROOT" --steps "$TEACHER_STEPS" 2>&1 \
        | "$PY" -P -m kdistill.trainer.console --log-format rich
else
    "$PY" -P -m kdistill.trainer.teacher_pretrain --pvc "$KDISTILL_PVC_ROOT" --steps "$TEACHER_STEPS" \
        | grep -E '"teacher-ready"|"step": (100|200|300|400|500),' || true
fi
test -f "$KDISTILL_PVC_ROOT/models/quickstart-teacher/model.safetensors"
teacher_done=$(date +%s)

echo "== 2/4 kdistill run examples/quickstart-cpu.yaml"
rm -rf "$OUT"
if [ "$ON_TERMINAL" = 1 ]; then
    "$KDISTILL" run examples/quickstart-cpu.yaml --output "$OUT" --log-format rich
else
    "$KDISTILL" run examples/quickstart-cpu.yaml --output "$OUT" --log-format json \
        | grep -E '"event": "(checkpoint|evaluated|qat-fake-quant|resumed)"|"step": [0-9]*0,' || true
fi
test -f "$OUT/result.json"
distill_done=$(date +%s)

echo "== 3/4 teacher vs student"
"$PY" -P - "$KDISTILL_PVC_ROOT/models/quickstart-teacher" "$OUT" "$started" "$teacher_done" "$distill_done" <<'PYEOF'
import json, sys, time
from pathlib import Path

teacher_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
started, teacher_done, distill_done = (int(x) for x in sys.argv[3:6])
pre = json.loads((teacher_dir / "pretrain-report.json").read_text())
res = json.loads((out / "result.json").read_text())

def params(d: Path) -> str:
    # Shapes from the safetensors header (8-byte length + JSON): no torch import, no tensor reads.
    import math, struct
    n = 0
    for f in d.glob("*.safetensors"):
        with f.open("rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        n += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return f"{n / 1e6:.2f}M"

fp, q = res.get("fullPrecision", {}), res.get("int8", {})
rows = [("model", "params", "eval perplexity", "retention")]
rows.append(("unigram baseline", "-", f"{pre['unigram_perplexity']:.1f}", "-"))
rows.append(("teacher (4 layers)", params(teacher_dir), f"{fp.get('teacher', float('nan')):.1f}", "1.000"))
rows.append(("student fp32 (2 layers)", params(out / "student"), f"{fp.get('student', float('nan')):.1f}",
             f"{fp.get('retention', float('nan')):.3f}"))
if q:
    rows.append(("student int8 (served)", "-", f"{q['student']:.1f}", f"{q['retention']:.3f}"))
w = [max(len(r[i]) for r in rows) for i in range(4)]
for i, r in enumerate(rows):
    print("  ".join(c.ljust(w[j]) for j, c in enumerate(r)))
    if i == 0:
        print("  ".join("-" * x for x in w))
print(f"\ndistillation: {res['steps']} steps, {res['tokensPerSecond']:.0f} tokens/s; outputs in {out}")
print(f"time: teacher {teacher_done - started}s, distillation {distill_done - teacher_done}s, "
      f"total {int(time.time()) - started}s")
PYEOF

echo "== 4/4 serve the INT8 student, send a real request, stop the server"
"$PY" -P scripts/quickstart_serve.py "$OUT/student-int8"
