# Pool `evaluate` results over seeds: each seed's win share, their spread, and a 95 % interval
# that resamples seeds and then prompts within each seed (a two-level bootstrap), so it holds
# the variation of pretraining, tuning and judging as well as that of the prompts.
# Standard library only. Input `runs`: a gather of `evaluate` steps, one per seed.
import json, os, random, statistics

inputs = os.environ["NEEDLE_INPUTS"]
if inputs.startswith("@"):
    inputs = open(inputs[1:]).read()
members = json.loads(inputs)["runs"]["members"]
runs = []
for m in members:
    with open(os.path.join(m["dir"], "metrics.json")) as f:
        runs.append((m["label"], json.load(f)))
if len(runs) < 2:
    raise SystemExit(f"a spread needs at least 2 seeds; the gather holds {len(runs)}")


def share(tallies, slot):
    n = sum(sum(t) for t in tallies)
    return sum(t[slot] for t in tallies) / max(n, 1)


rng = random.Random(0)
metrics, lines = {"seeds": len(runs)}, []
for axis in ["appeal", "faithfulness"]:
    per_seed = [list(m["per_prompt"][axis].values()) for _, m in runs]
    for slot, what in [(0, "win"), (2, "lose")]:
        values = [share(t, slot) for t in per_seed]
        draws = []
        for _ in range(2000):
            tallies = []
            for _ in per_seed:
                seed = rng.choice(per_seed)
                tallies += [rng.choice(seed) for _ in seed]
            draws.append(share(tallies, slot))
        draws.sort()
        lo, hi = draws[int(0.025 * len(draws))], draws[int(0.975 * len(draws)) - 1]
        metrics[f"{axis}_{what}_mean"] = statistics.mean(values)
        metrics[f"{axis}_{what}_sd"] = statistics.stdev(values)
        metrics[f"{axis}_{what}_min"] = min(values)
        metrics[f"{axis}_{what}_max"] = max(values)
        metrics[f"{axis}_{what}_95_seeds_and_prompts"] = [lo, hi]
        lines.append(
            f"| {axis} | {what} | {100 * statistics.mean(values):.1f} % | "
            f"{100 * statistics.stdev(values):.1f} | "
            + " / ".join(f"{100 * v:.1f}" for v in values)
            + f" | {100 * lo:.1f}–{100 * hi:.1f} % |"
        )

out = os.environ["NEEDLE_OUT"]
with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2)
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(
        f"Over {len(runs)} seeds ({', '.join(label for label, _ in runs)}):\n\n"
        "| axis | share | mean | sd (points) | each seed | 95 % over seeds and prompts |\n"
        "|---|---|---:|---:|---|---:|\n" + "\n".join(lines) + "\n"
    )
