#!/usr/bin/env python3
"""Generate the scheduling benchmark: independent `sleep` steps needing 1, 2 or 4 GPUs, and
print the makespan's lower bound max(critical path, GPU-seconds / GPUs).

Each GPU size is one step swept over its own zipped (i, seconds) lists; since a step's
instances only vary with the vars it uses, the product of the three sweeps still runs each
sleep exactly once.

usage: sched.py OUTDIR GPUS   (prints: bound critical gpu_seconds steps)
"""
import os
import random
import sys

out, gpus = sys.argv[1], int(sys.argv[2])
rng = random.Random(3)
sizes = {4: 6, 2: 12, 1: 24}
steps = {need: [round(rng.uniform(0.5, 2.0), 2) for _ in range(count)] for need, count in sizes.items()}
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "sched.toml"), "w") as f:
    f.write('[recipe]\nname = "sched"\n\n')
    for need, secs in steps.items():
        f.write("[[sweep.zip]]\n")
        f.write("i%d = [%s]\n" % (need, ", ".join(str(i) for i in range(len(secs)))))
        f.write("t%d = [%s]\n\n" % (need, ", ".join(str(s) for s in secs)))
    for need in steps:
        f.write('[steps.g%d]\nop = "exec"\ncmd = ["sleep", "${t%d}"]\nparams = { i = "${i%d}" }\n'
                'resources = { gpus = %d }\n\n' % (need, need, need, need))
all_steps = [(g, s) for g, secs in steps.items() for s in secs]
critical = max(s for _, s in all_steps)
gpu_seconds = sum(g * s for g, s in all_steps)
print(f"{max(critical, gpu_seconds / gpus):.3f} {critical:.3f} {gpu_seconds:.3f} {len(all_steps)}")
