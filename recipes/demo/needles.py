"""Keep the `keep` items with the highest observable score: the photogenic needles."""
import json, os

keep = int(os.environ["NEEDLE_PARAM_KEEP"])
with open(os.path.join(os.environ["NEEDLE_IN_POOL"], "items.jsonl")) as f:
    items = [json.loads(line) for line in f]
items.sort(key=lambda it: it["score"], reverse=True)
with open(os.path.join(os.environ["NEEDLE_OUT"], "items.jsonl"), "w") as out:
    for it in items[:keep]:
        out.write(json.dumps(it) + "\n")
print(f"kept {keep} of {len(items)}")
