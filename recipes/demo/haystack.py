"""A haystack of items, each with a hidden quality and a noisy observable score."""
import json, os, random

params = json.loads(os.environ["NEEDLE_PARAMS"])
rng = random.Random(params["seed"])
concepts = ["circle", "square", "triangle", "star"]
colours = ["red", "green", "blue", "yellow"]
with open(os.path.join(os.environ["NEEDLE_OUT"], "items.jsonl"), "w") as out:
    for i in range(params["items"]):
        quality = rng.betavariate(2, 3)
        score = quality + rng.gauss(0, 0.1)  # what an automatic scorer sees
        caption = f"a {rng.choice(colours)} {rng.choice(concepts)}"
        out.write(json.dumps({"id": i, "text": caption, "quality": quality, "score": score}) + "\n")
print(f"wrote {params['items']} items")
