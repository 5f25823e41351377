#!/usr/bin/env bash
# Run the demo recipe — the Emu experiment in miniature — and print its result table and where
# its pictures are.
set -euo pipefail
cd "$(dirname "$0")/.."
NEEDLE=target/release/needle
STORE=${NEEDLE_STORE:-.needle}
RECIPE=${DEMO_RECIPE:-recipes/emu-mini.toml}

set +e
"$NEEDLE" --store "$STORE" run "$RECIPE"
rc=$?
set -e
if [[ $rc -ne 0 ]]; then
  echo "the demo run failed (exit $rc): see '$NEEDLE --store $STORE status last'" >&2
  exit $rc
fi

show() { "$NEEDLE" --store "$STORE" show "last:$1"; }
# The summary of a step and the pictures of its output (`show` prints both).
section() {
  show "$1" | awk '/^summary$/ {on=1; next} /^files / {on=0; files=1; print ""; print "  files: " $2; next}
                   /^executions$/ {exit} on {print} files && /^  \// {print "  " $1}'
}

echo
echo "== the needles (the funnel: each stage's count and mean hidden quality) =="
section needles | sed -n '1,40p'
echo
echo "== quality-tuned vs pretrained, judged pair by pair =="
section evaluate
echo "  the paper (Emu vs its pretrained model, PartiPrompts, human raters): visual appeal"
echo "  won 82.9% / lost 15.4%; text faithfulness won 36.7% / lost 21.0%."
echo
echo "samples of each model, a row per prompt:"
show samples_pretrained | awk '/^  \/.*grid.png$/ {print "  pretrained:    " $1}'
show samples_tuned | awk '/^  \/.*grid.png$/ {print "  quality-tuned: " $1}'
echo
echo "every step:       $NEEDLE --store $STORE status last"
echo "one step:         $NEEDLE --store $STORE show last:evaluate   (or last:tuned, last:needles…)"
echo "its lineage:      $NEEDLE --store $STORE lineage last:evaluate"
echo "run it again:     make demo   (executes nothing: every step is cached)"
