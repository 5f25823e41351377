#!/usr/bin/env python3
"""Generate the benchmark DAG three ways: a needle recipe, a Snakefile, and the plain list of
commands an orchestrator-free shell would spawn.

Shape (as in an ablation): 1 shared root, N/4 arms of 4 chained steps, 1 final step reading
every arm. Every step is one trivial `sh -c` process writing one small file.

usage: gen.py OUTDIR N [--change]   (--change swaps the last arm's value for a new one)
"""
import os
import sys

out, n = sys.argv[1], int(sys.argv[2])
change = "--change" in sys.argv
arms = list(range(n // 4))
if change:
    arms[-1] = 10**9  # one arm's value changes: its 4 steps and the final step are new work
os.makedirs(out, exist_ok=True)

# needle
with open(os.path.join(out, "recipe.toml"), "w") as f:
    f.write('[recipe]\nname = "bench"\n\n[sweep]\narm = [%s]\n\n' % ", ".join(map(str, arms)))
    f.write('[steps.root]\nop = "exec"\ncmd = ["sh", "-c", "echo root > \\"$NEEDLE_OUT/o\\""]\n\n')
    prev = "root"
    for k in range(1, 5):
        f.write(
            '[steps.s%d]\nop = "exec"\ncmd = ["sh", "-c", "echo %d ${arm} > \\"$NEEDLE_OUT/o\\""]\n'
            'inputs = { up = "%s" }\n\n' % (k, k, prev)
        )
        prev = "s%d" % k
    f.write('[steps.final]\nop = "exec"\ncmd = ["sh", "-c", "echo final > \\"$NEEDLE_OUT/o\\""]\n'
            'inputs = { all = "s4[*]" }\n')

# Snakemake: the same DAG, the same commands
with open(os.path.join(out, "Snakefile"), "w") as f:
    f.write("ARMS = [%s]\n\n" % ", ".join(map(str, arms)))
    f.write('rule final:\n    input: expand("s4/{arm}.o", arm=ARMS)\n    output: "final.o"\n'
            '    shell: "echo final > {output}"\n\n')
    f.write('rule root:\n    output: "root.o"\n    shell: "echo root > {output}"\n\n')
    prev = '"root.o"'
    for k in range(1, 5):
        f.write('rule s%d:\n    input: %s\n    output: "s%d/{arm}.o"\n    shell: "echo %d {wildcards.arm} > {output}"\n\n'
                % (k, prev, k, k))
        prev = '"s%d/{arm}.o"' % k

# No orchestrator: the same processes, level by level, 2 at a time (xargs -P 2)
with open(os.path.join(out, "plain.sh"), "w") as f:
    f.write("set -e\ncd \"$(dirname \"$0\")/plain\"\n")
    f.write("sh -c 'echo root > root.o'\n")
    for k in range(1, 5):
        f.write("mkdir -p s%d\n" % k)
        f.write("printf '%%s\\n' %s | xargs -P 2 -I{} sh -c 'echo %d {} > s%d/{}.o'\n"
                % (" ".join(map(str, arms)), k, k))
    f.write("sh -c 'echo final > final.o'\n")
