//! Sampled sweeps: `[sweep.random]` and `[sweep.sobol]` draw `n` positions of one axis from a
//! distribution per var.
//!
//! Arms feed content keys, and keys feed a cache shared between machines, so a draw must be
//! the same bits everywhere and for ever:
//! - every draw is a pure function of (seed, var, index): growing `n` keeps the earlier arms;
//! - the random generator is BLAKE3 of those three, and the Sobol points are integer arithmetic
//!   ([`sobol_burley`]); either gives a [`Unit`], an exact fraction;
//! - turning a unit into a value uses only IEEE-754 `+ − × ÷`, which every platform rounds
//!   alike (the logarithm and exponential of `log_uniform` are computed here from those, not
//!   taken from the platform's libm), and floats are then rounded to decimal digits through
//!   Rust's exact formatting, so the value a label shows is the value a step gets.

use std::fmt;

use crate::value::Value;

/// Significant decimal digits a sampled float keeps (`log_uniform`; `uniform` counts them on
/// the width of its range). Enough to tell 100 000 arms apart, few enough to read in a label.
pub const SIGNIFICANT_DIGITS: usize = 6;

/// The most arms `[sweep.sobol]` draws: the length of the sequence [`sobol_burley`] addresses.
pub const MAX_SOBOL_ARMS: usize = 1 << 16;

/// The most vars `[sweep.sobol]` samples: one dimension of the sequence each.
pub const MAX_SOBOL_VARS: usize = sobol_burley::NUM_DIMENSIONS as usize;

/// The most values one sampled table draws (`n` × its vars), made when the recipe is parsed:
/// 100 000 arms of 20 vars, some 100 MB, where a typo could otherwise ask for gigabytes.
pub const MAX_DRAWS: usize = 2_000_000;

/// How the unit draws are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Independent uniform draws: var `v`'s i-th draw hashes (seed, `v`'s name, i), so adding
    /// or removing a var leaves the others' draws as they were.
    Random,
    /// An Owen-scrambled Sobol sequence: the i-th point's coordinates, one dimension per var
    /// in the order the table lists them. Any 2^k first points are spread evenly over each
    /// var's range (and over each pair's square); appending a var keeps the others' draws,
    /// inserting, removing or reordering vars changes those after it.
    Sobol,
}

impl Method {
    /// The table's name under `[sweep]`.
    pub fn table(self) -> &'static str {
        match self {
            Method::Random => "random",
            Method::Sobol => "sobol",
        }
    }

    /// The most arms this method draws.
    pub fn max_arms(self) -> usize {
        match self {
            Method::Random => super::MAX_ARMS,
            Method::Sobol => MAX_SOBOL_ARMS,
        }
    }
}

/// Where one var's values come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Distribution {
    /// A float in `[low, high]`, evenly.
    Uniform { low: f64, high: f64 },
    /// A float in `[low, high]` whose logarithm is even: as many draws in [1e-5, 1e-4] as in
    /// [1e-3, 1e-2]. Both bounds above 0.
    LogUniform { low: f64, high: f64 },
    /// An integer in `low..=high`, evenly.
    Int { low: i64, high: i64 },
    /// One of the values, evenly (a value listed twice is twice as likely).
    Choice(Vec<Value>),
}

/// The names a recipe writes, in the order error messages list them.
pub const DISTRIBUTIONS: &[&str] = &["uniform", "log_uniform", "int", "choice"];

impl Distribution {
    /// The value at unit draw `u`.
    pub fn draw(&self, u: Unit) -> Value {
        match self {
            Distribution::Uniform { low, high } => {
                let x = low + (high - low) * u.as_f64();
                let digits = SIGNIFICANT_DIGITS + decimal_exponent(low.abs().max(high.abs()))
                    - decimal_exponent(high - low);
                float(round_significant(x, digits).clamp(*low, *high))
            }
            Distribution::LogUniform { low, high } => {
                let (a, b) = (exact::ln(*low), exact::ln(*high));
                let x = exact::exp(a + (b - a) * u.as_f64());
                float(round_significant(x, SIGNIFICANT_DIGITS).clamp(*low, *high))
            }
            Distribution::Int { low, high } => {
                let span = (i128::from(*high) - i128::from(*low) + 1) as u128;
                let offset = u.scale(span);
                let x = i128::from(*low) + offset as i128;
                Value::from(i64::try_from(x).expect("low + offset <= high"))
            }
            Distribution::Choice(values) => values[u.scale(values.len() as u128) as usize].clone(),
        }
    }
}

/// A sampled axis: `n` positions, each var's value at position `i` drawn from its
/// distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampler {
    pub method: Method,
    pub n: usize,
    pub seed: u64,
    /// In the order the table lists them (a Sobol var's dimension is its place here).
    pub vars: Vec<(String, Distribution)>,
}

impl Sampler {
    /// The axis this sampler makes: `rows[i][j]` is var `j`'s i-th draw.
    ///
    /// Panics if a Sobol sampler has more than [`MAX_SOBOL_ARMS`] positions or
    /// [`MAX_SOBOL_VARS`] vars: the parser refuses those.
    pub fn axis(&self) -> super::Axis {
        let rows = (0..self.n)
            .map(|i| {
                self.vars
                    .iter()
                    .enumerate()
                    .map(|(dim, (name, dist))| dist.draw(self.unit(i, dim, name)))
                    .collect()
            })
            .collect();
        super::Axis {
            vars: self.vars.iter().map(|(name, _)| name.clone()).collect(),
            rows,
        }
    }

    fn unit(&self, index: usize, dim: usize, name: &str) -> Unit {
        match self.method {
            Method::Random => Unit::random(self.seed, name, index as u64),
            Method::Sobol => Unit::sobol(self.seed, dim, index),
        }
    }
}

/// A draw in [0, 1), held exactly as `k / 2^53`: integers until a distribution needs a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Unit(u64);

impl Unit {
    const BITS: u32 = 53;

    /// The i-th uniform draw of var `name` under `seed`. Versioned by its domain string: a new
    /// scheme must take a new one, or old recipes would change arms under their users.
    pub fn random(seed: u64, name: &str, index: u64) -> Unit {
        let mut h = blake3::Hasher::new_derive_key("needle 2026 sweep.random unit v1");
        h.update(&seed.to_le_bytes());
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&index.to_le_bytes());
        let bytes: [u8; 8] = h.finalize().as_bytes()[..8]
            .try_into()
            .expect("a BLAKE3 hash has 32 bytes");
        Unit(u64::from_le_bytes(bytes) >> (64 - Self::BITS))
    }

    /// Coordinate `dim` of the i-th point of the Sobol sequence scrambled by `seed`.
    pub fn sobol(seed: u64, dim: usize, index: usize) -> Unit {
        assert!(index < MAX_SOBOL_ARMS && dim < MAX_SOBOL_VARS);
        // The sequence takes a 32-bit seed: fold the high half in (seeds below 2^32 are
        // themselves).
        let seed = (seed ^ (seed >> 32)) as u32;
        let x = sobol_burley::sample(index as u32, dim as u32, seed);
        // `x` is some m / 2^23 (the crate keeps 23 bits of its 32), so this is exact.
        Unit((f64::from(x) * (1u64 << Self::BITS) as f64) as u64)
    }

    pub fn as_f64(self) -> f64 {
        self.0 as f64 / (1u64 << Self::BITS) as f64
    }

    /// `floor(self × n)`, exactly: which of `n` equal parts of [0, 1) the draw falls in.
    fn scale(self, n: u128) -> u128 {
        (u128::from(self.0) * n) >> Self::BITS
    }
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Distribution::Uniform { low, high } => write!(f, "uniform [{low}, {high}]"),
            Distribution::LogUniform { low, high } => write!(f, "log_uniform [{low}, {high}]"),
            Distribution::Int { low, high } => write!(f, "int [{low}, {high}]"),
            Distribution::Choice(values) => write!(f, "choice of {}", values.len()),
        }
    }
}

fn float(x: f64) -> Value {
    Value::from(serde_json::Number::from_f64(x).expect("a sampled float is finite"))
}

/// The power of ten of `x`'s leading digit (`0.03` → -2), as Rust's exact formatting writes it.
fn decimal_exponent(x: f64) -> usize {
    let s = format!("{:e}", x.abs());
    let e: i64 = s
        .split_once('e')
        .and_then(|(_, e)| e.parse().ok())
        .expect("`{:e}` writes an exponent");
    // Offset so that differences of exponents stay unsigned; floats span 10^-324..10^308.
    (e + 400) as usize
}

/// `x` to `digits` significant decimal digits. Formatting and parsing floats are exact in
/// Rust (correctly rounded both ways), so this is the same on every machine.
fn round_significant(x: f64, digits: usize) -> f64 {
    let digits = digits.clamp(1, 17);
    format!("{:.*e}", digits - 1, x)
        .parse()
        .expect("a formatted float parses")
}

/// The natural logarithm and exponential from IEEE-754 `+ − × ÷` only, so that they give the
/// same bits on every platform (libm's last bits differ between implementations). Accurate to
/// a few units in the last place, far below the digits a sampled value keeps.
mod exact {
    /// ln 2 split in two (fdlibm's): the high part has trailing zero bits, so `k × LN_2_HI` is
    /// exact for the `k` a float's exponent can be.
    const LN_2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN_2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);

    /// `ln x` for a finite `x > 0`.
    pub fn ln(x: f64) -> f64 {
        assert!(x > 0.0 && x.is_finite());
        // x = m · 2^e with m in [1, 2); a subnormal is first scaled up by 2^64 (exact).
        let (x, shift) = if x < f64::MIN_POSITIVE {
            (x * pow2(64), -64)
        } else {
            (x, 0)
        };
        let bits = x.to_bits();
        let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023 + shift;
        let mut m = f64::from_bits((bits & ((1 << 52) - 1)) | (1023 << 52));
        if m > std::f64::consts::SQRT_2 {
            m /= 2.0;
            e += 1;
        }
        // ln m = 2 atanh s = 2 (s + s³/3 + s⁵/5 + …), |s| <= 0.172: 12 terms reach 1e-19.
        let s = (m - 1.0) / (m + 1.0);
        let s2 = s * s;
        let mut term = s;
        let mut sum = 0.0;
        for k in 0..12 {
            sum += term / f64::from(2 * k + 1);
            term *= s2;
        }
        let e = e as f64;
        e * LN_2_HI + (e * LN_2_LO + 2.0 * sum)
    }

    /// `e^y` for a `y` whose result is a positive finite float.
    pub fn exp(y: f64) -> f64 {
        // e^y = 2^k · e^r with |r| <= ln 2 / 2; 20 Taylor terms reach 1e-24.
        let k = (y / std::f64::consts::LN_2).round();
        let r = (y - k * LN_2_HI) - k * LN_2_LO;
        let mut sum = 1.0;
        for n in (1..=20).rev() {
            sum = 1.0 + sum * r / f64::from(n);
        }
        // Scale in two halves, each a power of two within the normal range.
        let k = k as i64;
        let half = k / 2;
        sum * pow2(half) * pow2(k - half)
    }

    /// 2^k for -1022 <= k <= 1023, built from its bits.
    fn pow2(k: i64) -> f64 {
        assert!((-1022..=1023).contains(&k));
        f64::from_bits(((k + 1023) as u64) << 52)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sampler(method: Method, n: usize, vars: &[(&str, Distribution)]) -> Sampler {
        Sampler {
            method,
            n,
            seed: 7,
            vars: vars
                .iter()
                .map(|(k, d)| (k.to_string(), d.clone()))
                .collect(),
        }
    }

    fn floats(rows: &[Vec<Value>], j: usize) -> Vec<f64> {
        rows.iter().map(|r| r[j].as_f64().unwrap()).collect()
    }

    const LR: Distribution = Distribution::LogUniform {
        low: 1e-5,
        high: 1e-1,
    };
    const DROPOUT: Distribution = Distribution::Uniform {
        low: 0.0,
        high: 0.3,
    };

    #[test]
    fn exact_math_matches_libm_closely() {
        for x in [
            1e-300, 1e-5, 0.1, 0.5, 1.0, 1.5, 2.0, 10.0, 12345.678, 1e300,
        ] {
            let (ours, std) = (exact::ln(x), x.ln());
            assert!(
                (ours - std).abs() <= 4.0 * f64::EPSILON * std.abs().max(1.0),
                "ln {x}"
            );
        }
        assert_eq!(exact::ln(1.0), 0.0);
        let subnormal = 1e-310;
        assert!((exact::ln(subnormal) - subnormal.ln()).abs() < 1e-12);
        for y in [-700.0, -11.5, -1.0, -1e-9, 0.0, 0.3, 1.0, 2.5, 100.0, 700.0] {
            let (ours, std) = (exact::exp(y), f64::exp(y));
            assert!((ours - std).abs() <= 8.0 * f64::EPSILON * std, "exp {y}");
        }
        assert_eq!(exact::exp(0.0), 1.0);
    }

    #[test]
    fn the_same_seed_gives_the_same_bits() {
        // Pinned values: a change here changes every sampled key in every store. Never update
        // them to make the test pass; bump the domain string of `Unit::random` instead.
        let s = sampler(Method::Random, 3, &[("lr", LR), ("dropout", DROPOUT)]);
        assert_eq!(s.axis(), s.axis());
        let rows = serde_json::to_string(&s.axis().rows).unwrap();
        assert_eq!(
            rows,
            "[[0.0000117816,0.148258],[0.00936206,0.00497362],[0.000896229,0.276256]]"
        );
        let s = sampler(Method::Sobol, 3, &[("lr", LR), ("dropout", DROPOUT)]);
        let rows = s.axis().rows;
        assert_eq!(
            serde_json::to_string(&rows).unwrap(),
            "[[0.00529067,0.177779],[0.0000130606,0.0583855],[0.0181486,0.1095]]"
        );
        let other = Sampler {
            seed: 8,
            ..s.clone()
        };
        assert_ne!(other.axis().rows, rows, "another seed, other arms");
    }

    #[test]
    fn growing_n_keeps_the_earlier_arms() {
        for method in [Method::Random, Method::Sobol] {
            let vars = [
                ("lr", LR),
                ("layers", Distribution::Int { low: 2, high: 8 }),
            ];
            let small = sampler(method, 10, &vars).axis();
            let large = sampler(method, 40, &vars).axis();
            assert_eq!(large.rows[..10], small.rows[..], "{method:?}");
        }
    }

    #[test]
    fn a_random_var_keeps_its_draws_when_another_is_added() {
        let alone = sampler(Method::Random, 20, &[("lr", LR)]).axis();
        let with = sampler(Method::Random, 20, &[("dropout", DROPOUT), ("lr", LR)]).axis();
        assert_eq!(floats(&alone.rows, 0), floats(&with.rows, 1));
        // Appending to a Sobol table keeps the earlier vars' draws.
        let alone = sampler(Method::Sobol, 20, &[("lr", LR)]).axis();
        let with = sampler(Method::Sobol, 20, &[("lr", LR), ("dropout", DROPOUT)]).axis();
        assert_eq!(floats(&alone.rows, 0), floats(&with.rows, 0));
    }

    #[test]
    fn draws_stay_in_range_and_reach_both_ends() {
        for method in [Method::Random, Method::Sobol] {
            let choice = Distribution::Choice(vec![json!(0), json!("x"), json!([1])]);
            let s = sampler(
                method,
                2000,
                &[
                    ("lr", LR),
                    ("dropout", DROPOUT),
                    ("layers", Distribution::Int { low: -2, high: 2 }),
                    ("warmup", choice),
                ],
            );
            let rows = s.axis().rows;
            assert!(floats(&rows, 0).iter().all(|x| (1e-5..=1e-1).contains(x)));
            assert!(floats(&rows, 1).iter().all(|x| (0.0..=0.3).contains(x)));
            let mut ints: Vec<i64> = rows.iter().map(|r| r[2].as_i64().unwrap()).collect();
            ints.sort();
            ints.dedup();
            assert_eq!(ints, [-2, -1, 0, 1, 2], "{method:?}: both ends included");
            let mut choices: Vec<String> = rows.iter().map(|r| r[3].to_string()).collect();
            choices.sort();
            choices.dedup();
            assert_eq!(choices, ["\"x\"", "0", "[1]"]);
        }
    }

    #[test]
    fn the_widest_float_ranges_stay_finite_and_in_range() {
        let extremes = [
            Distribution::LogUniform {
                low: 5e-324,
                high: f64::MAX,
            },
            Distribution::Uniform {
                low: -1e307,
                high: 1e307,
            },
            Distribution::Uniform {
                low: 0.0,
                high: 5e-324,
            },
        ];
        for d in extremes {
            let (Distribution::LogUniform { low, high } | Distribution::Uniform { low, high }) = d
            else {
                unreachable!()
            };
            for u in [Unit(0), Unit(1 << 52), Unit((1 << 53) - 1)] {
                let x = d.draw(u).as_f64().unwrap();
                assert!((low..=high).contains(&x), "{d}: {x}");
            }
        }
    }

    proptest::proptest! {
        /// Any valid bounds, any unit draw: the value is of the right type and within bounds.
        #[test]
        fn every_draw_is_within_its_bounds(
            a in -1e12f64..1e12,
            width in 1e-9f64..1e12,
            i in proptest::num::i64::ANY,
            span in 1u64..u64::MAX,
            k in 0u64..(1 << 53),
        ) {
            let u = Unit(k);
            let x = Distribution::Uniform { low: a, high: a + width }.draw(u).as_f64().unwrap();
            proptest::prop_assert!((a..=a + width).contains(&x));
            let (low, high) = (a.abs().max(1e-300), a.abs().max(1e-300) + width);
            let x = Distribution::LogUniform { low, high }.draw(u).as_f64().unwrap();
            proptest::prop_assert!((low..=high).contains(&x));
            let high = i.saturating_add_unsigned(span);
            if i < high {
                let x = Distribution::Int { low: i, high }.draw(u).as_i64().unwrap();
                proptest::prop_assert!((i..=high).contains(&x));
            }
        }
    }

    #[test]
    fn int_ranges_as_wide_as_i64() {
        let d = Distribution::Int {
            low: i64::MIN,
            high: i64::MAX,
        };
        assert_eq!(d.draw(Unit(0)), json!(i64::MIN));
        assert_eq!(
            d.draw(Unit((1 << 53) - 1)).as_i64().unwrap() >> 50,
            i64::MAX >> 50
        );
    }

    #[test]
    fn log_uniform_is_even_in_the_logarithm() {
        for method in [Method::Random, Method::Sobol] {
            let mut xs = floats(&sampler(method, 1001, &[("lr", LR)]).axis().rows, 0);
            xs.sort_by(f64::total_cmp);
            let median = xs[500];
            // The median of log-uniform [1e-5, 1e-1] is 1e-3; a uniform one would be 0.05.
            assert!(
                (5e-4..2e-3).contains(&median),
                "{method:?}: median {median}"
            );
            let below_1e4 = xs.iter().filter(|x| **x < 1e-4).count();
            assert!((200..300).contains(&below_1e4), "{method:?}: {below_1e4}");
        }
    }

    #[test]
    fn sobol_spreads_a_power_of_two_evenly() {
        // The first 2^k points put one draw in each of 2^k equal parts of every dimension,
        // and (0, m, 2)-net: one in each of 16 boxes of 4 × 4 for the first two dimensions.
        let n = 16;
        for dim in 0..4 {
            let mut parts: Vec<u128> = (0..n).map(|i| Unit::sobol(7, dim, i).scale(16)).collect();
            parts.sort();
            assert_eq!(parts, (0..16).collect::<Vec<_>>(), "dimension {dim}");
        }
        let mut boxes: Vec<(u128, u128)> = (0..n)
            .map(|i| (Unit::sobol(7, 0, i).scale(4), Unit::sobol(7, 1, i).scale(4)))
            .collect();
        boxes.sort();
        boxes.dedup();
        assert_eq!(boxes.len(), 16);
        // Random draws, for contrast, rarely do: this seed leaves parts empty.
        let mut parts: Vec<u128> = (0..n as u64)
            .map(|i| Unit::random(7, "lr", i).scale(16))
            .collect();
        parts.sort();
        parts.dedup();
        assert!(parts.len() < 16);
    }

    #[test]
    fn floats_keep_six_significant_digits() {
        let rows = sampler(Method::Random, 50, &[("lr", LR)]).axis().rows;
        for x in floats(&rows, 0) {
            assert_eq!(x, format!("{x:.5e}").parse::<f64>().unwrap());
        }
        // A narrow range beside large bounds keeps 6 digits of its width.
        let narrow = Distribution::Uniform {
            low: 1000.0,
            high: 1001.0,
        };
        let x = narrow.draw(Unit(1 << 52)).as_f64().unwrap();
        assert_eq!(x, 1000.5);
        let x = narrow.draw(Unit::random(1, "x", 0)).as_f64().unwrap();
        assert_eq!(x, format!("{x:.8e}").parse::<f64>().unwrap(), "{x}");
        assert!(x != x.round(), "{x}: not rounded to the bound's digits");
    }

    #[test]
    fn unit_draws_are_below_one() {
        assert!(Unit((1 << 53) - 1).as_f64() < 1.0);
        assert_eq!(Unit(0).as_f64(), 0.0);
        for i in 0..1000 {
            assert!(Unit::random(0, "x", i).as_f64() < 1.0);
        }
    }
}
