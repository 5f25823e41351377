"""Pairwise comparison: for each prompt both models 'generate' (a draw around their level);
the higher-quality draw wins. Ties within a margin count as ties."""
import json, math, os, random

params = json.loads(os.environ["NEEDLE_PARAMS"])
def load(name):
    with open(os.path.join(os.environ[f"NEEDLE_IN_{name}"], "model.json")) as f:
        return json.load(f)
cand, base = load("CANDIDATE"), load("BASELINE")
rng = random.Random(params["seed"])
win = tie = lose = 0
for _ in range(params["prompts"]):
    a = rng.gauss(cand["level"], cand["spread"])
    b = rng.gauss(base["level"], base["spread"])
    if abs(a - b) < 0.02:
        tie += 1
    elif a > b:
        win += 1
    else:
        lose += 1
n = win + tie + lose
p = win / n
z = 1.96
centre = (p + z * z / (2 * n)) / (1 + z * z / n)
half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
result = {"win": win / n, "tie": tie / n, "lose": lose / n, "wilson95": [centre - half, centre + half],
          "train_items": cand["n"], "model": cand["kind"]}
with open(os.path.join(os.environ["NEEDLE_OUT"], "metrics.json"), "w") as out:
    json.dump(result, out, indent=2)
print(result)
