//! Across steps: inputs name existing steps, and data flows without cycles.

use super::*;

impl Parser<'_> {
    /// Inputs name existing steps, and the steps form no cycle.
    pub(super) fn check_inputs(&mut self, drafts: &[Draft]) {
        let index: HashMap<&str, usize> = drafts
            .iter()
            .enumerate()
            .map(|(i, d)| (d.def.name.as_str(), i))
            .collect();
        let names: Vec<&str> = drafts.iter().map(|d| d.def.name.as_str()).collect();
        // Edges: step → (upstream, span of the input naming it).
        let mut edges: Vec<Vec<(usize, Range<usize>)>> = vec![Vec::new(); drafts.len()];
        for (i, d) in drafts.iter().enumerate() {
            for (iname, input) in &d.def.inputs {
                let span = d.input_spans[iname].clone();
                match index.get(input.step.as_str()) {
                    Some(&j) => edges[i].push((j, span)),
                    None => {
                        let help = did_you_mean(&input.step, names.iter().copied()).or_else(|| {
                            Some(format!(
                                "the steps are {}",
                                backticked(names.iter().copied())
                            ))
                        });
                        self.error_help(
                            span,
                            format!(
                                "input `{iname}` of step `{}` reads unknown step `{}`",
                                d.def.name, input.step
                            ),
                            help,
                        );
                    }
                }
            }
        }
        for (names, span) in find_cycles(&edges) {
            let path: Vec<&str> = names.iter().map(|&i| drafts[i].def.name.as_str()).collect();
            self.error_help(
                span,
                format!("cycle: {}", path.join(" → ")),
                Some(
                    "each step reads the output of the step before it; a recipe must be a DAG"
                        .into(),
                ),
            );
        }
    }
}

/// Every cycle found by a depth-first search over `edges` (step → upstreams), each as the
/// steps in data-flow order (first step repeated at the end) with the span of the edge that
/// closes it.
pub(super) fn find_cycles(edges: &[Vec<(usize, Range<usize>)>]) -> Vec<(Vec<usize>, Range<usize>)> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut marks = vec![Mark::New; edges.len()];
    let mut cycles = Vec::new();
    for start in 0..edges.len() {
        if marks[start] != Mark::New {
            continue;
        }
        // Iterative DFS: (node, next edge to follow).
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        marks[start] = Mark::Open;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            if let Some((up, span)) = edges[node].get(*next) {
                *next += 1;
                match marks[*up] {
                    Mark::New => {
                        marks[*up] = Mark::Open;
                        stack.push((*up, 0));
                    }
                    Mark::Open => {
                        // `node` reads `up`, which is on the stack: the stack from `up` to
                        // `node` is a chain of readers; data flows the other way.
                        let from = stack.iter().position(|(n, _)| n == up).expect("open");
                        let mut cycle: Vec<usize> = vec![*up];
                        cycle.extend(stack[from..].iter().rev().map(|(n, _)| *n));
                        cycles.push((cycle, span.clone()));
                    }
                    Mark::Done => {}
                }
            } else {
                marks[node] = Mark::Done;
                stack.pop();
            }
        }
    }
    cycles
}
