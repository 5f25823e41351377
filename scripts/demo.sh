#!/usr/bin/env bash
# Run the demo recipe and say where its results are.
set -euo pipefail
cd "$(dirname "$0")/.."
NEEDLE=target/release/needle
STORE=${NEEDLE_STORE:-.needle}

set +e
"$NEEDLE" --store "$STORE" run recipes/demo.toml
rc=$?
set -e
if [[ $rc -ne 0 ]]; then
  echo "the demo run failed (exit $rc): see '$NEEDLE --store $STORE status last'" >&2
  exit $rc
fi

table=$("$NEEDLE" --store "$STORE" status last --json |
  python3 -c 'import json,sys; r=json.load(sys.stdin); print(next(s["output"] for s in r["steps"] if s["name"] == "table"))')
echo
echo "results (artifact ${table:0:12}):"
"$NEEDLE" --store "$STORE" show "$table" >/dev/null   # materialises its read-only view
cat "$STORE/views/$table/table.md"
echo
echo "the table:      $STORE/views/$table/table.md (and table.csv)"
echo "every step:     $NEEDLE --store $STORE status last"
echo "its lineage:    $NEEDLE --store $STORE lineage last:table"
echo "run it again:   make demo   (executes nothing: every step is cached)"
