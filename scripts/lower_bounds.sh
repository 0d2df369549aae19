#!/usr/bin/env bash
# The runtime at the lowest versions pyproject.toml allows: a wheel of this checkout installed with [serve] and each
# runtime dependency pinned to its lower bound (read from pyproject.toml), then greedy `generate` and a batched
# `bench` on ARTIFACT, whose tokens must equal those of the environment this script runs in.
# Usage: bash scripts/lower_bounds.sh ARTIFACT [VENV_DIR]   (inside an environment from scripts/setup_env.sh)
set -euo pipefail
export HF_HUB_OFFLINE=1
artifact=$(cd "${1:?usage: lower_bounds.sh ARTIFACT [VENV_DIR]}" && pwd)
venv=${2:-/tmp/medusa-export-lower-bounds}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# name>=X in [project] dependencies and the ort extra, as name==X
pins=$(python - "$here/pyproject.toml" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for spec in project["dependencies"] + project["optional-dependencies"]["ort"]:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([\w.]+)", spec.replace(" ", ""))
    if m:
        print(f"{m[1]}=={m[2]}")
EOF
)
echo "pins: $(echo $pins)"
# built from a copy of the package's files, so that the checkout gets no build/ folder
mkdir "$work/src"
cp -r "$here/pyproject.toml" "$here/README.md" "$here/runtime" "$here/exporter" "$here/engines" "$work/src/"
python -m pip wheel -q --no-deps --no-build-isolation -w "$work" "$work/src" >"$work/wheel.log" 2>&1 ||
    { cat "$work/wheel.log"; exit 1; }
python3 -m venv --clear "$venv"  # afresh: pip would keep an earlier run's wheel of the same version
"$venv/bin/python" -m pip install -q "$(ls "$work"/medusa_export-*.whl)[serve]" $pins
prompt="Give me three tips for writing clear technical documentation."
ids() { "$1" generate "$artifact" --prompt "$prompt" --max-new-tokens 48 --json | python -c \
        "import json, sys; print(json.load(sys.stdin)['token_ids'])"; }
low=$(cd "$work" && ids "$venv/bin/medusa-export")
now=$(cd "$work" && ids medusa-export)
[ "$low" = "$now" ] || { echo "different tokens at the lower bounds: $low vs $now" >&2; exit 1; }
echo "generate: the same 48 tokens at the lower bounds and here"
(cd "$work" && "$venv/bin/medusa-export" bench "$artifact" --no-hf --limit 2 --max-new-tokens 16 --concurrency 2 \
    --json "$work/bench.json" >"$work/bench.log" 2>&1) || { cat "$work/bench.log"; exit 1; }
python - "$work/bench.json" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["results"]
assert rows and all(r["identical_to_vanilla"] for r in rows), [(r["mode"], r["identical_to_vanilla"]) for r in rows]
print(f"bench at the lower bounds: {len(rows)} rows, every answer identical to vanilla")
EOF
