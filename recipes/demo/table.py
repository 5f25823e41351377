"""Gather every arm's metrics into one table (markdown and CSV)."""
import json, os

root = os.environ["NEEDLE_IN_RESULTS"]
with open(os.path.join(root, "index.json")) as f:
    index = json.load(f)
rows = []
for member in index:
    with open(os.path.join(root, member["dir"], "metrics.json")) as f:
        m = json.load(f)
    rows.append((member["label"], m))
rows.sort(key=lambda r: (r[1]["model"], r[1]["train_items"]))
lines = ["| arm | model | tuning items | win | tie | lose | win 95% CI |", "|---|---|---|---|---|---|---|"]
csv = ["arm,model,train_items,win,tie,lose,win_lo,win_hi"]
for label, m in rows:
    lo, hi = m["wilson95"]
    lines.append(f"| {label} | {m['model']} | {m['train_items']} | {m['win']:.1%} | {m['tie']:.1%} | {m['lose']:.1%} | {lo:.1%}-{hi:.1%} |")
    csv.append(f"{label},{m['model']},{m['train_items']},{m['win']:.4f},{m['tie']:.4f},{m['lose']:.4f},{lo:.4f},{hi:.4f}")
out = os.environ["NEEDLE_OUT"]
with open(os.path.join(out, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
with open(os.path.join(out, "table.csv"), "w") as f:
    f.write("\n".join(csv) + "\n")
print("\n".join(lines))
