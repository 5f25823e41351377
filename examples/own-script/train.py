# A training script as needle runs it: params from the environment, results into $NEEDLE_OUT,
# checkpoints in $NEEDLE_RESUME. Standard library only; the "model" fits y = w*x + b.
import json, os, random, sys

params = json.loads(os.environ["NEEDLE_PARAMS"])  # every param, as one JSON object
lr, epochs = float(params["lr"]), int(params["epochs"])
out = os.environ["NEEDLE_OUT"]  # whatever is written here becomes the step's artifact
resume = os.environ["NEEDLE_RESUME"]  # kept across failed attempts, removed on success
os.makedirs(resume, exist_ok=True)

# NEEDLE_SEED comes from the step's key: a resumed attempt draws the same data.
rng = random.Random(int(os.environ["NEEDLE_SEED"]))
data = [(x, 3 * x + 1 + rng.gauss(0, 0.1)) for x in (rng.uniform(-1, 1) for _ in range(200))]
loss = lambda s: sum((s["w"] * x + s["b"] - y) ** 2 for x, y in data) / len(data)

checkpoint = os.path.join(resume, "checkpoint.json")
state = {"epoch": 0, "w": 0.0, "b": 0.0}
if os.path.exists(checkpoint):
    with open(checkpoint) as f:
        state = json.load(f)
    print(f"resuming after epoch {state['epoch']}")

for epoch in range(state["epoch"], epochs):
    for x, y in data:
        err = state["w"] * x + state["b"] - y
        state["w"], state["b"] = state["w"] - lr * err * x, state["b"] - lr * err
    state["epoch"] = epoch + 1
    with open(checkpoint + ".tmp", "w") as f:
        json.dump(state, f)
    os.replace(checkpoint + ".tmp", checkpoint)  # write, then rename: never half a checkpoint
    with open(os.environ["NEEDLE_PROGRESS"], "a") as f:  # the live display shows the last line
        print(json.dumps({"done": epoch + 1, "total": epochs, "unit": "epoch", "loss": loss(state)}), file=f)
    if os.environ.get("CRASH_AFTER") == str(epoch + 1):  # to try resuming: docs/how-to/resume.md
        sys.exit(f"crashing after epoch {epoch + 1}, as CRASH_AFTER asked")

with open(os.path.join(out, "metrics.json"), "w") as f:  # `needle results` shows its numbers
    json.dump({"loss": loss(state), "w": state["w"], "b": state["b"]}, f)
with open(os.path.join(out, "model.json"), "w") as f:
    json.dump(state, f)
