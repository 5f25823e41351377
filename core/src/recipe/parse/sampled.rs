//! `[sweep.random]` and `[sweep.sobol]`: `n`, `seed` and a distribution per var, read into a
//! [`Sampler`] whose draws become one axis of the sweep. What the draws are is
//! [`crate::recipe::sample`]'s business; this reads the TOML and points at what is wrong.

use super::*;
use crate::recipe::sample::{
    DISTRIBUTIONS, Distribution, MAX_DRAWS, MAX_SOBOL_VARS, Method, Sampler,
};

/// Why `n` and `seed` cannot be sampled vars.
const RESERVED_HELP: &str = "`n` and `seed` set the sampled table itself; sample a var named so under another name, such as `init_seed`";

impl Parser<'_> {
    /// The axis of a sampled table, or `None` (reported) when it is malformed. Its vars are
    /// recorded as swept either way, so that steps using them are not also told they are
    /// undefined.
    pub(super) fn sampled_table(
        &mut self,
        method: Method,
        table: &Node<'_>,
        draft: &mut SweepDraft,
    ) -> Option<Axis> {
        let DeValue::Table(t) = table.get_ref() else {
            return None;
        };
        let name = format!("[sweep.{}]", method.table());
        let mut n = None;
        let mut seed = None;
        let mut vars = Vec::new();
        let mut ok = true;
        for (k, val) in t.iter() {
            let key = key_str(k);
            if matches!(key, "n" | "seed") && val.get_ref().is_table() {
                // Meant as a var: reported as a setting, and not undefined where it is used.
                draft.broken.insert(key.to_string());
            }
            match key {
                "n" => n = self.arm_count(method, val),
                "seed" => seed = self.sample_seed(&name, val),
                _ => {
                    if !self.var_name_ok(key, k.span()) {
                        ok = false;
                        continue;
                    }
                    let Some(dist) = self.distribution(key, val) else {
                        draft.broken.insert(key.to_string());
                        ok = false;
                        continue;
                    };
                    if !self.first_sweep(key, k.span(), &mut draft.keys) {
                        ok = false;
                        continue;
                    }
                    vars.push((key.to_string(), dist));
                }
            }
        }
        let present = |k: &str| t.iter().any(|(key, _)| key_str(key) == k);
        if !present("n") {
            self.error_help(
                table.span(),
                format!("`{name}` has no `n`"),
                Some("write `n = 16`: how many arms to draw".into()),
            );
        }
        if !present("seed") {
            self.error_help(
                table.span(),
                format!("`{name}` has no `seed`"),
                Some("write `seed = 0` (any integer): the same seed draws the same arms on every machine, another seed other arms".into()),
            );
        }
        if vars.is_empty() && ok {
            self.error_help(
                table.span(),
                format!("`{name}` samples no var"),
                Some("add one a line, such as `lr = { log_uniform = [1e-5, 1e-2] }`".into()),
            );
            return None;
        }
        if method == Method::Sobol && vars.len() > MAX_SOBOL_VARS {
            self.error(
                table.span(),
                format!(
                    "`{name}` samples {} vars, more than the {MAX_SOBOL_VARS} dimensions of its sequence",
                    vars.len()
                ),
            );
            return None;
        }
        let (Some(n), Some(seed)) = (n, seed) else {
            return None;
        };
        if !ok {
            return None;
        }
        if n.saturating_mul(vars.len()) > MAX_DRAWS {
            self.error_help(
                table.span(),
                format!(
                    "`{name}` draws {n} × {} values, more than the limit of {MAX_DRAWS}",
                    vars.len()
                ),
                Some("draw fewer arms, or sample fewer vars and fix the rest in `[vars]`".into()),
            );
            return None;
        }
        Some(
            Sampler {
                method,
                n,
                seed,
                vars,
            }
            .axis(),
        )
    }

    /// `n`: how many positions the axis has.
    fn arm_count(&mut self, method: Method, v: &Node<'_>) -> Option<usize> {
        let max = method.max_arms();
        let n = match v.get_ref() {
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).ok(),
            _ => None,
        };
        match n {
            Some(n) if n >= 1 && n as u64 <= max as u64 => Some(n as usize),
            _ => {
                let help = if v.get_ref().is_table() {
                    RESERVED_HELP.to_string()
                } else if !matches!(v.get_ref(), DeValue::Integer(_)) {
                    "write the number of arms as an integer: `n = 16`".to_string()
                } else if n.is_some_and(|n| n < 1) {
                    "`n` is how many arms to draw: at least one".to_string()
                } else if method == Method::Sobol {
                    format!(
                        "a Sobol sequence is addressed up to {max} points; `[sweep.random]` draws up to {}",
                        Method::Random.max_arms()
                    )
                } else {
                    format!("a sweep has at most {max} arms")
                };
                self.error_help(
                    v.span(),
                    format!(
                        "`n` must be an integer from 1 to {max}, found {}",
                        describe(v)
                    ),
                    Some(help),
                );
                None
            }
        }
    }

    fn sample_seed(&mut self, table: &str, v: &Node<'_>) -> Option<u64> {
        let seed = match v.get_ref() {
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).ok(),
            _ => None,
        };
        match seed.and_then(|s| u64::try_from(s).ok()) {
            Some(s) => Some(s),
            None => {
                self.error_help(
                    v.span(),
                    format!(
                        "`seed` of `{table}` must be an integer from 0 up, found {}",
                        describe(v)
                    ),
                    Some(if v.get_ref().is_table() {
                        RESERVED_HELP.into()
                    } else {
                        "`seed = 0`: the same seed draws the same arms, another seed other arms"
                            .into()
                    }),
                );
                None
            }
        }
    }

    /// `{ uniform = [low, high] }` and its kin.
    fn distribution(&mut self, var: &str, v: &Node<'_>) -> Option<Distribution> {
        let names = backticked(DISTRIBUTIONS.iter().copied());
        let entries: Vec<_> = match v.get_ref() {
            DeValue::Table(t) => t.iter().collect(),
            other => {
                let help = if matches!(other, DeValue::Array(_)) {
                    format!(
                        "a list of values is a grid axis: put it in `[sweep]`, or draw from it with `{var} = {{ choice = [...] }}`"
                    )
                } else {
                    format!(
                        "write `{var} = {{ uniform = [low, high] }}`; the distributions are {names}; a constant belongs in `[vars]`"
                    )
                };
                self.error_help(
                    v.span(),
                    format!(
                        "sampled var `{var}` needs a distribution, found {}",
                        describe(v)
                    ),
                    Some(help),
                );
                return None;
            }
        };
        let [(k, args)] = entries[..] else {
            self.error_help(
                v.span(),
                format!(
                    "sampled var `{var}` has {} distributions; it takes one",
                    entries.len()
                ),
                Some(format!(
                    "write one of {names}, such as `{var} = {{ uniform = [0.0, 1.0] }}`"
                )),
            );
            return None;
        };
        let dist = key_str(k);
        match dist {
            "uniform" | "log_uniform" => {
                let [low, high] = self.bounds(var, dist, args)?;
                let (lo, hi) = (number(low)?, number(high)?);
                if lo >= hi {
                    self.error_help(
                        args.span(),
                        format!("`{dist}` for `{var}` needs low < high, found [{lo}, {hi}]"),
                        Some(
                            "write the smaller bound first; a constant belongs in `[vars]`".into(),
                        ),
                    );
                    return None;
                }
                if dist == "uniform" {
                    if !(hi - lo).is_finite() {
                        self.error(
                            args.span(),
                            format!("the range of `{var}` is wider than a float holds"),
                        );
                        return None;
                    }
                    return Some(Distribution::Uniform { low: lo, high: hi });
                }
                if lo <= 0.0 {
                    self.error_help(
                        low.span(),
                        format!("`log_uniform` for `{var}` needs bounds above 0, found {lo}"),
                        Some("a logarithmic scale never reaches 0: start at a small positive value such as 1e-8, or use `uniform`".into()),
                    );
                    return None;
                }
                Some(Distribution::LogUniform { low: lo, high: hi })
            }
            "int" => {
                let [low, high] = self.bounds(var, dist, args)?;
                let mut ints = [low, high].map(|b| match b.get_ref() {
                    DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).ok(),
                    _ => None,
                });
                for (b, i) in [low, high].iter().zip(&mut ints) {
                    if i.is_none() {
                        self.error_help(
                            b.span(),
                            format!("`int` bounds of `{var}` must be integers, found {}", describe(b)),
                            Some("both ends are included: `int = [2, 8]`; for real numbers use `uniform`".into()),
                        );
                    }
                }
                let [Some(lo), Some(hi)] = ints else {
                    return None;
                };
                if lo >= hi {
                    self.error_help(
                        args.span(),
                        format!("`int` for `{var}` needs low < high, found [{lo}, {hi}]"),
                        Some(
                            "write the smaller bound first; a constant belongs in `[vars]`".into(),
                        ),
                    );
                    return None;
                }
                Some(Distribution::Int { low: lo, high: hi })
            }
            "choice" => match args.get_ref() {
                DeValue::Array(items) if items.is_empty() => {
                    self.error(args.span(), format!("`choice` for `{var}` has no values"));
                    None
                }
                DeValue::Array(items) => {
                    let values: Option<Vec<Value>> = items.iter().map(|i| self.value(i)).collect();
                    Some(Distribution::Choice(values?))
                }
                _ => {
                    self.error_help(
                        args.span(),
                        format!(
                            "`choice` for `{var}` takes a list of values, found {}",
                            describe(args)
                        ),
                        Some(format!("write `{var} = {{ choice = [a, b, c] }}`")),
                    );
                    None
                }
            },
            other => {
                let help = did_you_mean(other, DISTRIBUTIONS.iter().copied())
                    .unwrap_or_else(|| format!("the distributions are {names}"));
                self.error_help(
                    k.span(),
                    format!("unknown distribution `{other}` for `{var}`"),
                    Some(help),
                );
                None
            }
        }
    }

    /// The two bounds of `[low, high]`, numbers (an `int` checks they are integers itself).
    fn bounds<'v, 'i>(
        &mut self,
        var: &str,
        dist: &str,
        args: &'v Node<'i>,
    ) -> Option<[&'v Node<'i>; 2]> {
        let bad = |p: &mut Self, found: String| {
            p.error_help(
                args.span(),
                format!("`{dist}` for `{var}` takes [low, high], found {found}"),
                Some(format!("write `{var} = {{ {dist} = [low, high] }}`")),
            );
            None
        };
        let DeValue::Array(items) = args.get_ref() else {
            return bad(self, describe(args));
        };
        let items: Vec<_> = items.iter().collect();
        let [low, high] = items[..] else {
            let found = match items.len() {
                1 => "1 value".to_string(),
                n => format!("{n} values"),
            };
            return bad(self, found);
        };
        for b in [low, high] {
            if number(b).is_none() {
                self.error_help(
                    b.span(),
                    format!(
                        "a bound of `{dist}` for `{var}` must be a number, found {}",
                        describe(b)
                    ),
                    None,
                );
                return None;
            }
        }
        Some([low, high])
    }
}

/// A finite TOML int or float as `f64`.
fn number(v: &Node<'_>) -> Option<f64> {
    let x = match v.get_ref() {
        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).ok()? as f64,
        DeValue::Float(f) => f.as_str().parse().ok()?,
        _ => return None,
    };
    x.is_finite().then_some(x)
}
