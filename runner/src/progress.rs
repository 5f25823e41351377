//! What the user sees while a run goes: a live status line on a terminal (indicatif), plain
//! lines otherwise. Everything goes to stderr, so `--json` output on stdout stays clean.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use needle_core::recipe::bindings_label;
use needle_core::store::{AttemptResult, RunStep, StepStatus, fmt_ms};

use crate::attempt::RunOutcome;

/// One line on stderr in a single write: stderr is unbuffered, and a formatted line would
/// otherwise go out in as many writes as it has pieces.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut line = format!($($arg)*);
        line.push('\n');
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}

/// A running step as the display shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunningStep {
    pub name: String,
    pub elapsed: Duration,
    /// The last progress line it wrote (`NEEDLE_PROGRESS`), if any.
    pub progress: Option<needle_ops::Progress>,
}

impl RunningStep {
    /// `pretrain 1m02s 1200/3000 step · loss 0.0431 · 812/s`
    fn describe(&self) -> String {
        let mut s = format!("{} {}", self.name, fmt_ms(self.elapsed.as_millis() as u64));
        if let Some(p) = &self.progress {
            match p.total {
                Some(total) => s.push_str(&format!(" {}/{total} {}", p.done, p.unit)),
                None => s.push_str(&format!(" {} {}", p.done, p.unit)),
            }
            if let Some(loss) = p.loss {
                s.push_str(&format!(" · loss {loss:.4}"));
            }
            if let Some(rate) = p.rate {
                s.push_str(&format!(" · {rate:.0}/s"));
            }
        }
        s
    }
}

/// Plain output repeats a running step's progress this often.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(15);

/// A step still running after this long gets a line saying so (plain output).
const ANNOUNCE_AFTER: Duration = Duration::from_secs(2);

pub trait Progress: Send {
    fn started(&mut self, step: &RunStep, attempt: u32);
    /// A step reached a terminal state other than failure.
    fn finished(&mut self, step: &RunStep, note: Option<&str>);
    /// A finished step is to execute again (its output was dropped as damaged): it no longer
    /// counts as finished.
    fn reopened(&mut self, step: &RunStep);
    fn retrying(&mut self, step: &RunStep, result: &AttemptResult, delay: Duration, log: &[String]);
    fn failed(&mut self, step: &RunStep, reason: &str, log: &[String]);
    fn interrupted(&mut self, count: u32, running: usize);
    /// A line of its own (e.g. how many steps a failure skipped).
    fn note(&mut self, text: &str);
    fn update(&mut self, counts: &RunOutcome, running: &[RunningStep]);
    fn done(&mut self, outcome: &RunOutcome);
}

/// The live display on a terminal, plain lines elsewhere.
pub fn for_stderr(total: usize) -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Box::new(Live::new(total))
    } else {
        Box::new(Plain {
            total,
            finished: 0,
            announced: Default::default(),
        })
    }
}

pub fn step_label(step: &RunStep) -> String {
    if step.bindings.is_empty() {
        step.name.clone()
    } else {
        format!("{}[{}]", step.name, bindings_label(&step.bindings))
    }
}

fn attempt_duration(step: &RunStep) -> Option<String> {
    step.attempts
        .last()
        .filter(|a| a.ended >= a.started && a.ended > 0)
        .map(|a| fmt_ms(a.ended - a.started))
}

fn failure_text(step: &RunStep, reason: &str, log: &[String]) -> String {
    let mut s = format!("failed  {}: {reason}", step_label(step));
    match step.attempts.last() {
        Some(a) if !a.log.is_empty() => s.push_str(&format!("\n        log: {}", a.log)),
        Some(_) => s.push_str("\n        (it wrote no output)"),
        None => {}
    }
    for line in log {
        s.push_str(&format!("\n        | {line}"));
    }
    s
}

fn retry_text(step: &RunStep, result: &AttemptResult, delay: Duration, log: &[String]) -> String {
    format!(
        "{}\n        retrying in {}",
        failure_text(step, &result.describe(), log),
        humantime::format_duration(delay)
    )
}

struct Plain {
    total: usize,
    finished: usize,
    /// Running steps announced as still running, and when last.
    announced: std::collections::HashMap<String, std::time::Instant>,
}

impl Progress for Plain {
    fn started(&mut self, step: &RunStep, attempt: u32) {
        // First attempts are announced only once they have run a while (see `update`): a line
        // per trivial step would double the output without saying anything.
        if attempt > 1 {
            say!("start   {} (attempt {attempt})", step_label(step));
        }
    }

    fn finished(&mut self, step: &RunStep, note: Option<&str>) {
        self.finished += 1;
        // Cached steps are counted in the summary; a line each would bury what ran.
        if let StepStatus::Succeeded { output } = &step.status {
            let took = attempt_duration(step).unwrap_or_default();
            say!(
                "done    {} {took} -> {} [{}/{}]",
                step_label(step),
                output.short(),
                self.finished,
                self.total
            );
        } else if matches!(step.status, StepStatus::Interrupted) {
            say!("interrupted {}{}", step_label(step), note.unwrap_or(""));
        }
    }

    fn reopened(&mut self, _step: &RunStep) {
        self.finished = self.finished.saturating_sub(1);
    }

    fn retrying(
        &mut self,
        step: &RunStep,
        result: &AttemptResult,
        delay: Duration,
        log: &[String],
    ) {
        say!("{}", retry_text(step, result, delay, log));
    }

    fn failed(&mut self, step: &RunStep, reason: &str, log: &[String]) {
        self.finished += 1;
        say!("{}", failure_text(step, reason, log));
    }

    fn interrupted(&mut self, count: u32, running: usize) {
        if count == 1 {
            say!("interrupted: stopping {running} running step(s) (Ctrl-C again to kill)");
        } else {
            say!("killing {running} running step(s)");
        }
    }

    fn note(&mut self, text: &str) {
        say!("{text}");
    }

    fn update(&mut self, _counts: &RunOutcome, running: &[RunningStep]) {
        for r in running {
            if r.elapsed < ANNOUNCE_AFTER {
                continue;
            }
            // Announced once; then, for steps that report progress, a line every so often.
            let due = match self.announced.get(&r.name) {
                None => true,
                Some(last) => r.progress.is_some() && last.elapsed() >= PLAIN_PROGRESS_EVERY,
            };
            if due {
                self.announced
                    .insert(r.name.clone(), std::time::Instant::now());
                say!("running {}", r.describe());
            }
        }
    }

    fn done(&mut self, _outcome: &RunOutcome) {}
}

struct Live {
    bar: ProgressBar,
}

impl Live {
    fn new(total: usize) -> Live {
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:24} {pos}/{len} {wide_msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        Live { bar }
    }
}

impl Progress for Live {
    fn started(&mut self, _step: &RunStep, _attempt: u32) {}

    fn reopened(&mut self, _step: &RunStep) {
        self.bar.dec(1);
    }

    fn finished(&mut self, step: &RunStep, _note: Option<&str>) {
        self.bar.inc(1);
        if let StepStatus::Succeeded { .. } = step.status {
            let took = attempt_duration(step).unwrap_or_default();
            self.bar
                .println(format!("done    {} {took}", step_label(step)));
        }
    }

    fn retrying(
        &mut self,
        step: &RunStep,
        result: &AttemptResult,
        delay: Duration,
        log: &[String],
    ) {
        self.bar.println(retry_text(step, result, delay, log));
    }

    fn failed(&mut self, step: &RunStep, reason: &str, log: &[String]) {
        self.bar.inc(1);
        self.bar.println(failure_text(step, reason, log));
    }

    fn interrupted(&mut self, count: u32, running: usize) {
        let msg = if count == 1 {
            format!("interrupted: stopping {running} running step(s) (Ctrl-C again to kill)")
        } else {
            format!("killing {running} running step(s)")
        };
        self.bar.println(msg);
    }

    fn note(&mut self, text: &str) {
        self.bar.println(text);
    }

    fn update(&mut self, c: &RunOutcome, running: &[RunningStep]) {
        let mut msg = format!(
            "done {} · cached {} · running {} · failed {}",
            c.executed,
            c.cached,
            running.len(),
            c.failed
        );
        if c.skipped > 0 {
            msg.push_str(&format!(" · skipped {}", c.skipped));
        }
        if c.stopped > 0 {
            msg.push_str(&format!(" · stopped {}", c.stopped));
        }
        let mut longest: Vec<&RunningStep> = running.iter().collect();
        longest.sort_by_key(|r| std::cmp::Reverse(r.elapsed));
        let names: Vec<String> = longest.iter().take(3).map(|r| r.describe()).collect();
        if !names.is_empty() {
            msg.push_str(" │ ");
            msg.push_str(&names.join(", "));
            if running.len() > 3 {
                msg.push_str(&format!(" +{}", running.len() - 3));
            }
        }
        self.bar.set_message(msg);
    }

    fn done(&mut self, _outcome: &RunOutcome) {
        self.bar.finish_and_clear();
    }
}
