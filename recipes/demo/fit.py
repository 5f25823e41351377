"""A stand-in model: the quality level it will generate at, learned from its training items."""
import argparse, json, os, statistics

ap = argparse.ArgumentParser()
ap.add_argument("--model", choices=["mean", "trimmed"], required=True)
args = ap.parse_args()
with open(os.path.join(os.environ["NEEDLE_IN_DATA"], "items.jsonl")) as f:
    qualities = sorted(json.loads(line)["quality"] for line in f)
if args.model == "trimmed":
    cut = len(qualities) // 10
    qualities = qualities[cut : len(qualities) - cut] or qualities
model = {"kind": args.model, "level": statistics.fmean(qualities), "spread": statistics.pstdev(qualities), "n": len(qualities)}
with open(os.path.join(os.environ["NEEDLE_OUT"], "model.json"), "w") as out:
    json.dump(model, out, indent=2)
print(model)
