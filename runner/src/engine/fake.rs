//! An executor for the engine's unit tests: attempts start no process; a script says how each
//! ends, and a test holds attempts open and ends them when it chooses. It keeps the local
//! executor's pool and shapes (see `Executor::Fake`), so scheduling is the real one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use needle_core::store::{AttemptResult, now_millis};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::attempt::{AttemptEnd, AttemptSpec, Event, Handle, Held};

/// How an attempt ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Script {
    /// Exits 0 having written `out/result` (the step's name, attempt and inputs).
    Succeed,
    /// Exits with this code.
    Fail(i32),
    /// Runs until the test ends it ([`Fake::end`]) or the engine stops it.
    Hold,
}

/// An attempt the engine started, as the test sees it.
#[derive(Debug, Clone)]
pub struct Launched {
    pub job: String,
    pub step: String,
    pub attempt: u32,
    pub held: Held,
}

struct Open {
    spec: AttemptSpec,
    events: UnboundedSender<Event>,
    started: u64,
}

#[derive(Default)]
struct State {
    next: u64,
    open: HashMap<String, Open>,
    /// The most attempts open at once.
    most_open: usize,
    /// Jobs the engine stopped, and whether with SIGKILL.
    stopped: Vec<(String, bool)>,
    launches: Vec<Launched>,
}

type Scripter = Box<dyn Fn(&AttemptSpec) -> Script + Send + Sync>;

pub struct Fake {
    script: Scripter,
    state: Mutex<State>,
    launched: UnboundedSender<Launched>,
}

impl Fake {
    /// A fake whose attempts end as `script` says; each launch is also sent on the receiver.
    pub fn new(
        script: impl Fn(&AttemptSpec) -> Script + Send + Sync + 'static,
    ) -> (Arc<Fake>, UnboundedReceiver<Launched>) {
        let (launched, rx) = unbounded_channel();
        let fake = Fake {
            script: Box::new(script),
            state: Mutex::default(),
            launched,
        };
        (Arc::new(fake), rx)
    }

    pub fn launch(&self, spec: AttemptSpec, events: UnboundedSender<Event>) {
        let script = (self.script)(&spec);
        let job = {
            let mut state = self.state.lock().unwrap();
            state.next += 1;
            format!("fake-{}", state.next)
        };
        let _ = events.send(Event::Started {
            node: spec.node,
            handle: Handle::Job(job.clone()),
        });
        let launched = Launched {
            job: job.clone(),
            step: spec.step_name.clone(),
            attempt: spec.attempt,
            held: spec.held.clone(),
        };
        let _ = self.launched.send(launched.clone());
        let open = Open {
            spec,
            events,
            started: now_millis(),
        };
        let mut state = self.state.lock().unwrap();
        state.launches.push(launched);
        state.open.insert(job.clone(), open);
        state.most_open = state.most_open.max(state.open.len());
        drop(state);
        match script {
            Script::Hold => {}
            Script::Succeed | Script::Fail(_) => self.end(&job, script),
        }
    }

    /// End the open attempt `job` as `script` says (`Hold` is not an end).
    pub fn end(&self, job: &str, script: Script) {
        let open = (self.state.lock().unwrap().open.remove(job))
            .unwrap_or_else(|| panic!("{job} is not open"));
        let result = match script {
            Script::Succeed => {
                let inputs: Vec<String> = open.spec.inputs.keys().cloned().collect();
                let text = format!(
                    "{} attempt {} inputs {inputs:?}",
                    open.spec.step_name, open.spec.attempt
                );
                std::fs::write(open.spec.slot.join("out").join("result"), text)
                    .expect("writing the fake output");
                AttemptResult::Success
            }
            Script::Fail(code) => AttemptResult::Failed { code },
            Script::Hold => panic!("Hold does not end an attempt"),
        };
        Self::send_end(open, result);
    }

    /// The engine stops attempts: they end at once, killed by the signal it sent.
    pub fn stop(&self, jobs: &[String], kill: bool) {
        let mut state = self.state.lock().unwrap();
        state
            .stopped
            .extend(jobs.iter().map(|job| (job.clone(), kill)));
        let ended: Vec<Open> = jobs.iter().filter_map(|j| state.open.remove(j)).collect();
        drop(state);
        let signal = if kill { libc::SIGKILL } else { libc::SIGTERM };
        for open in ended {
            Self::send_end(open, AttemptResult::Signaled { signal, oom: None });
        }
    }

    /// Every attempt launched, in order.
    pub fn launches(&self) -> Vec<Launched> {
        self.state.lock().unwrap().launches.clone()
    }

    pub fn most_open(&self) -> usize {
        self.state.lock().unwrap().most_open
    }

    pub fn stopped(&self) -> Vec<(String, bool)> {
        self.state.lock().unwrap().stopped.clone()
    }

    fn send_end(open: Open, result: AttemptResult) {
        let end = AttemptEnd {
            node: open.spec.node,
            result,
            started: open.started,
            ended: now_millis(),
            staging: Some(open.spec.slot.clone()),
            log: None,
            gpus: None,
            job: None,
        };
        let _ = open.events.send(Event::Ended(end));
    }
}
