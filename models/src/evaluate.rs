//! `evaluate`: candidate against baseline, pair by pair, as the paper's human study did.
//!
//! Both sample sets must come from the same prompts and seeds (the `sample` op gives the same
//! (prompt, seed) the same initial noise in every model), so each pair differs only by the model.
//!
//! - **Visual appeal**: each appeal judge scores both images and votes A (candidate), B or tie
//!   (scores within `margin`); the majority of the panel decides, a split panel is a tie.
//! - **Text faithfulness**: each faithfulness judge says whether each image shows its prompt;
//!   A wins when only A does, B when only B does, both or neither is a tie; majority decides.
//!
//! For each axis: win / tie / lose shares (ties stay in the denominator, as in the paper), a
//! Wilson 95 % interval of the win share, a bootstrap 95 % interval over prompts, and a two-sided
//! sign-test p-value (wins against losses). Where `unseen` lists prompts no training caption
//! holds (combinations held out of every haystack), both axes are reported again on those
//! prompts and on the seen rest, under `by_prompts`. `per_prompt` keeps each prompt's win /
//! tie / lose counts, so that runs over several seeds can be pooled (`scripts/seed_spread.py`). Plus memorisation (share of samples whose nearest
//! tuning image is closer than a threshold) and diversity within a prompt, for both models.
//! Output: `metrics.json`, `grid.png` (per prompt: baseline | candidate), `summary.md`.

use std::collections::BTreeMap;

use image::RgbImage;
use needle_core::ops::OpSchema;
use needle_ops::dataset::{Dataset, Pixels};
use needle_ops::{Op, OpContext, OpError};
use serde::Serialize;
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::judges::Panel;

pub struct EvaluateOp;

/// Win, tie and lose counts of the candidate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub win: usize,
    pub tie: usize,
    pub lose: usize,
}

impl Tally {
    pub fn n(&self) -> usize {
        self.win + self.tie + self.lose
    }

    fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Win => self.win += 1,
            Outcome::Tie => self.tie += 1,
            Outcome::Lose => self.lose += 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Win,
    Tie,
    Lose,
}

/// The majority of a panel's votes; a split panel is a tie.
pub fn majority(votes: &[Outcome]) -> Outcome {
    let count = |o| votes.iter().filter(|v| **v == o).count();
    let (w, t, l) = (
        count(Outcome::Win),
        count(Outcome::Tie),
        count(Outcome::Lose),
    );
    if w > t && w > l {
        Outcome::Win
    } else if l > t && l > w {
        Outcome::Lose
    } else {
        Outcome::Tie
    }
}

/// What the metrics say of one axis.
#[derive(Debug, Clone, Serialize)]
pub struct AxisReport {
    pub win: f64,
    pub tie: f64,
    pub lose: f64,
    pub pairs: usize,
    /// Wilson 95 % interval of the win share.
    pub wilson95: [f64; 2],
    /// Bootstrap 95 % interval of the win share, resampling prompts.
    pub bootstrap95: [f64; 2],
    /// Two-sided sign test of wins against losses (ties dropped).
    pub sign_test_p: f64,
    /// The same for the lose share, to say whether the candidate is worse.
    pub lose_wilson95: [f64; 2],
}

impl Op for EvaluateOp {
    fn schema(&self) -> OpSchema {
        needle_ops::schemas::evaluate()
    }

    fn run(&self, ctx: &OpContext) -> Result<(), OpError> {
        let margin: f64 = ctx.param("margin")?;
        let resamples: usize = ctx.param("bootstrap")?;
        let threshold: f64 = ctx.param("memorised_below")?;
        let seed: u64 = ctx.param("seed")?;
        let unseen: Vec<String> = ctx.param("unseen")?;
        let device = crate::device(ctx);
        let threads = ctx.cpus as usize;

        let candidate = Dataset::open(ctx.input("candidate")?)?;
        let baseline = Dataset::open(ctx.input("baseline")?)?;
        let pairs = pair_up(&candidate, &baseline)?;
        let cand = candidate.select(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
        let base = baseline.select(&pairs.iter().map(|p| p.1).collect::<Vec<_>>());
        let (cand_px, base_px) = (cand.load_pixels(threads)?, base.load_pixels(threads)?);
        let prompts: Vec<&str> = cand.records().iter().map(|r| r.text.as_str()).collect();
        let tuning = match ctx.optional_input("tuning")? {
            Some(dir) => Some(Dataset::open(dir)?),
            None => None,
        };
        check_unseen(&unseen, &prompts, tuning.as_ref())?;

        let panel = Panel::load(ctx.input("judges")?, device)?;
        // Appeal: per judge, a vote per pair.
        let ca = panel.appeal_scores(&cand_px, device)?;
        let ba = panel.appeal_scores(&base_px, device)?;
        let appeal: Vec<Outcome> = (0..pairs.len())
            .map(|i| {
                let votes: Vec<Outcome> = ca
                    .iter()
                    .zip(&ba)
                    .map(|(c, b)| {
                        let d = f64::from(c[i]) - f64::from(b[i]);
                        if d > margin {
                            Outcome::Win
                        } else if d < -margin {
                            Outcome::Lose
                        } else {
                            Outcome::Tie
                        }
                    })
                    .collect();
                majority(&votes)
            })
            .collect();
        // Faithfulness: per judge, does each image show its prompt?
        let cm = panel.matches(&cand_px, &prompts, device)?;
        let bm = panel.matches(&base_px, &prompts, device)?;
        let faithful: Vec<Outcome> = (0..pairs.len())
            .map(|i| {
                let votes: Vec<Outcome> = cm
                    .iter()
                    .zip(&bm)
                    .map(|(c, b)| match (c[i], b[i]) {
                        (true, false) => Outcome::Win,
                        (false, true) => Outcome::Lose,
                        _ => Outcome::Tie,
                    })
                    .collect();
                majority(&votes)
            })
            .collect();

        let appeal_report = axis(&appeal, &prompts, resamples, seed);
        let faithful_report = axis(&faithful, &prompts, resamples, seed ^ 1);
        let faithful_share = |m: &[Vec<bool>]| {
            let n = m.iter().map(Vec::len).sum::<usize>().max(1);
            m.iter().flatten().filter(|b| **b).count() as f64 / n as f64
        };

        let by_prompts = if unseen.is_empty() {
            serde_json::Value::Null
        } else {
            let is_unseen: Vec<bool> = prompts
                .iter()
                .map(|p| unseen.iter().any(|u| u == p))
                .collect();
            let part = |want: bool, salt: u64| {
                let pick: Vec<usize> = (0..prompts.len())
                    .filter(|&i| is_unseen[i] == want)
                    .collect();
                let sub = |o: &[Outcome]| pick.iter().map(|&i| o[i]).collect::<Vec<_>>();
                let ps: Vec<&str> = pick.iter().map(|&i| prompts[i]).collect();
                let share = |m: &[Vec<bool>]| {
                    let n = (m.len() * pick.len()).max(1);
                    m.iter()
                        .map(|v| pick.iter().filter(|&&i| v[i]).count())
                        .sum::<usize>() as f64
                        / n as f64
                };
                json!({
                    "pairs": pick.len(),
                    "prompts": ps.iter().collect::<std::collections::BTreeSet<_>>().len(),
                    "appeal": axis(&sub(&appeal), &ps, resamples, seed ^ salt),
                    "faithfulness": axis(&sub(&faithful), &ps, resamples, seed ^ salt ^ 1),
                    "faithful_share": {"candidate": share(&cm), "baseline": share(&bm)},
                })
            };
            json!({"seen": part(false, 0x5EE), "unseen": part(true, 0x0115EE)})
        };

        let memorisation = match &tuning {
            Some(tuning) => {
                let tuning = tuning.load_pixels(threads)?;
                let (c_share, c_mean) = nearest(&cand_px, &tuning, threshold, device);
                let (b_share, b_mean) = nearest(&base_px, &tuning, threshold, device);
                json!({
                    "threshold_rmse": threshold,
                    "candidate": c_share,
                    "baseline": b_share,
                    "candidate_mean_nearest_rmse": c_mean,
                    "baseline_mean_nearest_rmse": b_mean,
                })
            }
            None => serde_json::Value::Null,
        };
        let diversity = json!({
            "candidate": diversity(&cand_px, &prompts, device),
            "baseline": diversity(&base_px, &prompts, device),
        });
        let n_prompts = prompts
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let metrics = json!({
            "pairs": pairs.len(),
            "prompts": n_prompts,
            "judges": {"appeal": panel.appeal.len(), "faithfulness": panel.faithfulness.len()},
            "margin": margin,
            "appeal": appeal_report,
            "faithfulness": faithful_report,
            "faithful_share": {"candidate": faithful_share(&cm), "baseline": faithful_share(&bm)},
            "mean_appeal_score": {
                "candidate": mean_of(&ca),
                "baseline": mean_of(&ba),
            },
            "by_prompts": by_prompts,
            "per_prompt": {
                "appeal": per_prompt(&appeal, &prompts),
                "faithfulness": per_prompt(&faithful, &prompts),
            },
            "memorisation": memorisation,
            "diversity": diversity,
        });
        let path = ctx.out.join("metrics.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&metrics).expect("json") + "\n",
        )
        .map_err(OpError::io("write", &path))?;
        write_grid(ctx, &cand, &cand_px, &base_px)?;
        let path = ctx.out.join(needle_ops::SUMMARY);
        std::fs::write(&path, summary(&metrics)).map_err(OpError::io("write", &path))
    }
}

/// (candidate index, baseline index) of each pair, matched by (prompt, seed index).
fn pair_up(candidate: &Dataset, baseline: &Dataset) -> Result<Vec<(usize, usize)>, OpError> {
    let key = |r: &needle_ops::dataset::Record| {
        let seed = r
            .extra
            .get("seed_index")
            .map(|v| v.to_string())
            .unwrap_or_else(|| r.file_name.clone());
        (r.text.clone(), seed)
    };
    let base: BTreeMap<(String, String), usize> = baseline
        .records()
        .iter()
        .enumerate()
        .map(|(i, r)| (key(r), i))
        .collect();
    let mut pairs = Vec::new();
    let mut unmatched = 0;
    for (i, r) in candidate.records().iter().enumerate() {
        match base.get(&key(r)) {
            Some(&j) => pairs.push((i, j)),
            None => unmatched += 1,
        }
    }
    if unmatched > 0 || pairs.len() != baseline.len() {
        return Err(OpError::Input {
            name: "candidate".into(),
            why: format!(
                "and `baseline` must hold the same prompts and seeds: {} pairs match, {unmatched} \
                 candidate and {} baseline samples do not",
                pairs.len(),
                baseline.len() - pairs.len()
            ),
        });
    }
    Ok(pairs)
}

/// `prompt → [win, tie, lose]` counts: what a gather over seeds needs to resample seeds and
/// prompts together.
fn per_prompt(outcomes: &[Outcome], prompts: &[&str]) -> BTreeMap<String, [usize; 3]> {
    let mut per: BTreeMap<String, [usize; 3]> = BTreeMap::new();
    for (o, p) in outcomes.iter().zip(prompts) {
        let slot = match o {
            Outcome::Win => 0,
            Outcome::Tie => 1,
            Outcome::Lose => 2,
        };
        per.entry(p.to_string()).or_default()[slot] += 1;
    }
    per
}

/// Every `unseen` prompt must be among the samples' prompts (a typo would otherwise report an
/// empty set), and no caption of the tuning set may name one (it would not be unseen).
fn check_unseen(
    unseen: &[String],
    prompts: &[&str],
    tuning: Option<&Dataset>,
) -> Result<(), OpError> {
    let bad = |why: String| OpError::Param {
        name: "unseen".into(),
        why,
    };
    for u in unseen {
        if !prompts.contains(&u.as_str()) {
            return Err(bad(format!("`{u}` is not a prompt of the samples")));
        }
        if let Some(t) = tuning
            && t.records()
                .iter()
                .any(|r| r.text.trim().eq_ignore_ascii_case(u.trim()))
        {
            return Err(bad(format!(
                "`{u}` is a caption of the tuning set, so it is not unseen"
            )));
        }
    }
    Ok(())
}

fn axis(outcomes: &[Outcome], prompts: &[&str], resamples: usize, seed: u64) -> AxisReport {
    let mut t = Tally::default();
    for o in outcomes {
        t.add(*o);
    }
    let n = t.n().max(1) as f64;
    // Per prompt tallies, for the bootstrap.
    let mut per: BTreeMap<&str, Tally> = BTreeMap::new();
    for (o, p) in outcomes.iter().zip(prompts) {
        per.entry(p).or_default().add(*o);
    }
    let groups: Vec<Tally> = per.into_values().collect();
    AxisReport {
        win: t.win as f64 / n,
        tie: t.tie as f64 / n,
        lose: t.lose as f64 / n,
        pairs: t.n(),
        wilson95: wilson(t.win, t.n()),
        bootstrap95: bootstrap(&groups, resamples, seed),
        sign_test_p: sign_test(t.win, t.lose),
        lose_wilson95: wilson(t.lose, t.n()),
    }
}

/// Wilson score interval (95 %) of `k` successes in `n`.
pub fn wilson(k: usize, n: usize) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    let (k, n, z) = (k as f64, n as f64, 1.959_963_984_540_054);
    let p = k / n;
    let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / (1.0 + z * z / n);
    [(centre - half).max(0.0), (centre + half).min(1.0)]
}

/// Two-sided exact sign test: how likely a split at least this uneven is between `wins` and
/// `losses` if each were a fair coin.
pub fn sign_test(wins: usize, losses: usize) -> f64 {
    let n = wins + losses;
    if n == 0 {
        return 1.0;
    }
    let k = wins.min(losses);
    // log C(n, i) - n log 2, summed for i <= k.
    let ln_fact = |m: usize| (1..=m).map(|i| (i as f64).ln()).sum::<f64>();
    let ln_n = ln_fact(n);
    let tail: f64 = (0..=k)
        .map(|i| (ln_n - ln_fact(i) - ln_fact(n - i) - n as f64 * std::f64::consts::LN_2).exp())
        .sum();
    (2.0 * tail).min(1.0)
}

/// Percentile bootstrap (95 %) of the win share, resampling prompts with replacement.
pub fn bootstrap(groups: &[Tally], resamples: usize, seed: u64) -> [f64; 2] {
    if groups.is_empty() || resamples == 0 {
        return [0.0, 1.0];
    }
    let mut state = seed ^ 0x0B00_7574_AA55;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut shares: Vec<f64> = (0..resamples)
        .map(|_| {
            let (mut w, mut n) = (0usize, 0usize);
            for _ in 0..groups.len() {
                let g = &groups[(next() % groups.len() as u64) as usize];
                w += g.win;
                n += g.n();
            }
            w as f64 / n.max(1) as f64
        })
        .collect();
    shares.sort_by(f64::total_cmp);
    let at = |q: f64| shares[((shares.len() - 1) as f64 * q).round() as usize];
    [at(0.025), at(0.975)]
}

fn mean_of(scores: &[Vec<f32>]) -> f64 {
    let n = scores.iter().map(Vec::len).sum::<usize>().max(1);
    scores.iter().flatten().map(|&s| f64::from(s)).sum::<f64>() / n as f64
}

/// Images as rows of values in [0, 1]: [n, h·w·3].
fn flat(p: &Pixels, device: Device) -> Tensor {
    Tensor::from_slice(&p.data)
        .view([p.n as i64, (p.height * p.width * 3) as i64])
        .to_kind(Kind::Float)
        .to_device(device)
        / 255.0
}

/// Share of `samples` whose nearest `tuning` image is within `threshold` (RMSE per value), and
/// the mean nearest distance.
fn nearest(samples: &Pixels, tuning: &Pixels, threshold: f64, device: Device) -> (f64, f64) {
    if samples.n == 0 || tuning.n == 0 || samples.height != tuning.height {
        return (0.0, f64::NAN);
    }
    let d = (samples.height * samples.width * 3) as f64;
    let (a, b) = (flat(samples, device), flat(tuning, device));
    let nearest: Vec<f64> = tch::no_grad(|| {
        let chunks: Vec<Tensor> = a
            .split(256, 0)
            .iter()
            .map(|x| Tensor::cdist(x, &b, 2.0, None::<i64>).min_dim(1, false).0)
            .collect();
        Tensor::cat(&chunks, 0)
    })
    .to_device(Device::Cpu)
    .try_into()
    .map(|v: Vec<f32>| v.into_iter().map(|x| f64::from(x) / d.sqrt()).collect())
    .unwrap_or_default();
    let share =
        nearest.iter().filter(|&&x| x < threshold).count() as f64 / nearest.len().max(1) as f64;
    let mean = nearest.iter().sum::<f64>() / nearest.len().max(1) as f64;
    (share, mean)
}

/// Mean pairwise RMSE between the samples of each prompt, averaged over prompts.
fn diversity(p: &Pixels, prompts: &[&str], device: Device) -> f64 {
    let mut groups: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (i, prompt) in prompts.iter().enumerate() {
        groups.entry(prompt).or_default().push(i as i64);
    }
    let d = ((p.height * p.width * 3) as f64).sqrt();
    let all = flat(p, device);
    let per: Vec<f64> = groups
        .values()
        .filter(|g| g.len() > 1)
        .map(|g| {
            let x = all.index_select(0, &Tensor::from_slice(g).to_device(device));
            let dist = tch::no_grad(|| Tensor::cdist(&x, &x, 2.0, None::<i64>));
            let n = g.len() as f64;
            // The diagonal is zero: average over the n(n-1) off-diagonal entries.
            dist.sum(Kind::Double).double_value(&[]) / (n * (n - 1.0)) / d
        })
        .collect();
    per.iter().sum::<f64>() / per.len().max(1) as f64
}

/// A contact sheet: one row per prompt (up to 16), its baseline samples then its candidate
/// samples (up to 4 each), upscaled ×4 so it can be looked at.
fn write_grid(
    ctx: &OpContext,
    cand: &Dataset,
    cand_px: &Pixels,
    base_px: &Pixels,
) -> Result<(), OpError> {
    const PER_SIDE: usize = 4;
    const SCALE: u32 = 4;
    let mut rows: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, r) in cand.records().iter().enumerate() {
        if let Some((_, v)) = rows.iter_mut().find(|(p, _)| *p == r.text) {
            v.push(i);
        } else if rows.len() < 16 {
            rows.push((r.text.as_str(), vec![i]));
        }
    }
    let s = cand_px.height as u32 * SCALE;
    let gap = s / 2;
    let width = 2 * PER_SIDE as u32 * (s + 2) + gap;
    let height = rows.len() as u32 * (s + 2);
    let mut img = RgbImage::from_pixel(width.max(1), height.max(1), image::Rgb([255, 255, 255]));
    for (row, (_, idx)) in rows.iter().enumerate() {
        for (col, &i) in idx.iter().take(PER_SIDE).enumerate() {
            for (side, px) in [(0u32, base_px), (1u32, cand_px)] {
                let x0 = side * (PER_SIDE as u32 * (s + 2) + gap) + col as u32 * (s + 2);
                let y0 = row as u32 * (s + 2);
                let src = px.image(i);
                let w = px.width;
                for y in 0..s {
                    for x in 0..s {
                        let (sx, sy) = ((x / SCALE) as usize, (y / SCALE) as usize);
                        let o = 3 * (sy * w + sx);
                        img.put_pixel(x0 + x, y0 + y, image::Rgb([src[o], src[o + 1], src[o + 2]]));
                    }
                }
            }
        }
    }
    let bytes = needle_ops::dataset::encode_png(&img).map_err(OpError::io("encode", "grid.png"))?;
    let path = ctx.out.join("grid.png");
    std::fs::write(&path, bytes).map_err(OpError::io("write", &path))
}

fn summary(m: &serde_json::Value) -> String {
    let pct = |v: &serde_json::Value| format!("{:.1}%", 100.0 * v.as_f64().unwrap_or(f64::NAN));
    let interval = |v: &serde_json::Value| {
        format!(
            "{:.1}–{:.1}%",
            100.0 * v[0].as_f64().unwrap_or(f64::NAN),
            100.0 * v[1].as_f64().unwrap_or(f64::NAN)
        )
    };
    let mut md = format!(
        "Candidate vs baseline on {} pairs ({} prompts), {} appeal and {} faithfulness judges.\n\n\
         | axis | win | tie | lose | win 95% (Wilson) | win 95% (bootstrap) | sign test p |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        m["pairs"], m["prompts"], m["judges"]["appeal"], m["judges"]["faithfulness"]
    );
    let row = |label: String, a: &serde_json::Value| {
        format!(
            "| {label} | {} | {} | {} | {} | {} | {:.2e} |\n",
            pct(&a["win"]),
            pct(&a["tie"]),
            pct(&a["lose"]),
            interval(&a["wilson95"]),
            interval(&a["bootstrap95"]),
            a["sign_test_p"].as_f64().unwrap_or(f64::NAN)
        )
    };
    let axes = [
        ("visual appeal", "appeal"),
        ("text faithfulness", "faithfulness"),
    ];
    for (name, key) in axes {
        md.push_str(&row(name.to_string(), &m[key]));
    }
    for set in ["seen", "unseen"] {
        let part = &m["by_prompts"][set];
        if part.is_null() {
            continue;
        }
        for (name, key) in axes {
            let label = format!("{name}, {set} prompts ({} pairs)", part["pairs"]);
            md.push_str(&row(label, &part[key]));
        }
    }
    md.push_str(&format!(
        "\nImages showing their prompt: candidate {}, baseline {}. Diversity within a prompt \
         (RMSE): candidate {:.3}, baseline {:.3}.\n",
        pct(&m["faithful_share"]["candidate"]),
        pct(&m["faithful_share"]["baseline"]),
        m["diversity"]["candidate"].as_f64().unwrap_or(f64::NAN),
        m["diversity"]["baseline"].as_f64().unwrap_or(f64::NAN),
    ));
    if !m["memorisation"].is_null() {
        md.push_str(&format!(
            "Memorised (nearest tuning image within RMSE {}): candidate {}, baseline {}.\n",
            m["memorisation"]["threshold_rmse"],
            pct(&m["memorisation"]["candidate"]),
            pct(&m["memorisation"]["baseline"]),
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_a_known_value() {
        // 82.9% of 1600 (the paper's headline): about 80.9%–84.7%.
        let [lo, hi] = wilson(1326, 1600);
        assert!(
            (lo - 0.8096).abs() < 0.002 && (hi - 0.8468).abs() < 0.002,
            "{lo} {hi}"
        );
        assert_eq!(wilson(0, 0), [0.0, 1.0]);
    }

    #[test]
    fn sign_test_values() {
        assert!((sign_test(5, 5) - 1.0).abs() < 1e-12);
        // 9 of 10: p = 2 * 11 / 1024.
        assert!((sign_test(9, 1) - 22.0 / 1024.0).abs() < 1e-9);
        assert!(sign_test(180, 40) < 1e-15);
    }

    #[test]
    fn majority_and_ties() {
        use Outcome::*;
        assert_eq!(majority(&[Win, Win, Lose, Tie, Win]), Win);
        assert_eq!(majority(&[Win, Lose, Tie]), Tie);
        assert_eq!(majority(&[Win, Win, Lose, Lose, Tie]), Tie);
        assert_eq!(majority(&[Lose, Lose, Win]), Lose);
    }

    #[test]
    fn bootstrap_brackets_the_share() {
        let groups: Vec<Tally> = (0..16)
            .map(|i| Tally {
                win: 10 + i % 3,
                tie: 1,
                lose: 4,
            })
            .collect();
        let [lo, hi] = bootstrap(&groups, 1000, 1);
        let total: usize = groups.iter().map(|g| g.n()).sum();
        let share = groups.iter().map(|g| g.win).sum::<usize>() as f64 / total as f64;
        assert!(
            lo < share && share < hi && hi - lo < 0.1,
            "{lo} {share} {hi}"
        );
    }
}
