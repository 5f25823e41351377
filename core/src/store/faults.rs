//! Fault injection at named points of the store's write paths, for the tests that prove a
//! failed or killed commit loses nothing.
//!
//! Every write a commit makes — a blob made read-only, copied in, renamed into `blobs/`, the
//! `syncfs` that makes it durable, the journal append, the sled transaction and its flush —
//! first passes [`Store::fault_point`] with a name. Normally that is one branch on `None`.
//! A test arms a plan, in process (`Store::arm_faults`) or for a whole `needle` process through
//! `NEEDLE_TEST_FAULT`, read when the store opens:
//!
//! ```text
//! NEEDLE_TEST_FAULT=trace:PATH       append each point's name to PATH as it is passed
//! NEEDLE_TEST_FAULT=abort@N          abort the process at the N-th point (1-based): a kill
//! NEEDLE_TEST_FAULT=abort@NAME       abort at the first pass of the point NAME
//! NEEDLE_TEST_FAULT=eio@N            the N-th point's write fails with EIO (enospc@N: ENOSPC)
//! NEEDLE_TEST_FAULT=abort@N,trace:PATH   both: a run that passes fewer points shows how many
//! ```
//!
//! An abort, like SIGKILL, runs no destructor and flushes nothing the program had not written;
//! what the kernel already holds survives, as it does for a killed process.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use super::{Store, StoreError};

/// What an armed plan does when it triggers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// End the process at once, as a kill would.
    Abort,
    /// The write fails with this `errno` instead of being made.
    Fail(i32),
}

/// When an armed plan triggers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultTrigger {
    /// At the n-th point passed (1-based), whatever its name.
    Nth(usize),
    /// At the first pass of the point with this name.
    Named(String),
    /// Never: only record the points passed.
    Never,
}

#[derive(Debug)]
pub struct FaultPlan {
    trigger: FaultTrigger,
    action: FaultAction,
    /// Where each point passed is appended, one name a line.
    trace: Option<PathBuf>,
    passed: Mutex<Vec<&'static str>>,
}

impl FaultPlan {
    pub fn new(trigger: FaultTrigger, action: FaultAction) -> FaultPlan {
        FaultPlan {
            trigger,
            action,
            trace: None,
            passed: Mutex::new(Vec::new()),
        }
    }

    /// The plan `NEEDLE_TEST_FAULT` describes; `None` when it is unset.
    pub fn from_env() -> Result<Option<FaultPlan>, StoreError> {
        match std::env::var("NEEDLE_TEST_FAULT") {
            Ok(v) => FaultPlan::parse(&v).map(Some),
            Err(_) => Ok(None),
        }
    }

    pub fn parse(spec: &str) -> Result<FaultPlan, StoreError> {
        let bad = || StoreError::BadFaultPlan {
            spec: spec.to_string(),
        };
        let mut plan = FaultPlan::new(FaultTrigger::Never, FaultAction::Abort);
        for part in spec.split(',') {
            if let Some(path) = part.strip_prefix("trace:") {
                if plan.trace.is_some() {
                    return Err(bad());
                }
                plan.trace = Some(PathBuf::from(path));
                continue;
            }
            if plan.trigger != FaultTrigger::Never {
                return Err(bad());
            }
            let (action, at) = part.split_once('@').ok_or_else(bad)?;
            plan.action = match action {
                "abort" => FaultAction::Abort,
                "eio" => FaultAction::Fail(libc::EIO),
                "enospc" => FaultAction::Fail(libc::ENOSPC),
                _ => return Err(bad()),
            };
            plan.trigger = match at.parse::<usize>() {
                Ok(0) => return Err(bad()),
                Ok(n) => FaultTrigger::Nth(n),
                Err(_) if !at.is_empty() => FaultTrigger::Named(at.to_string()),
                Err(_) => return Err(bad()),
            };
        }
        Ok(plan)
    }

    /// The names of the points passed so far, in order.
    pub fn passed(&self) -> Vec<&'static str> {
        self.passed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn pass(&self, point: &'static str) -> std::io::Result<()> {
        let (n, first_of_its_name) = {
            let mut passed = self.passed.lock().unwrap_or_else(|e| e.into_inner());
            let first = !passed.contains(&point);
            passed.push(point);
            (passed.len(), first)
        };
        if let Some(path) = &self.trace {
            // Written and closed before the write it names: an abort there leaves it in.
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            writeln!(f, "{point}")?;
        }
        let now = match &self.trigger {
            FaultTrigger::Nth(at) => n == *at,
            FaultTrigger::Named(name) => name == point && first_of_its_name,
            FaultTrigger::Never => false,
        };
        if !now {
            return Ok(());
        }
        match self.action {
            FaultAction::Abort => std::process::abort(),
            FaultAction::Fail(errno) => Err(std::io::Error::from_raw_os_error(errno)),
        }
    }
}

impl Store {
    /// Arm `plan` for this store's later writes (a test's; a store opened with
    /// `NEEDLE_TEST_FAULT` set has that plan already).
    pub fn arm_faults(&mut self, plan: FaultPlan) {
        self.faults = Some(Box::new(plan));
    }

    /// The armed plan, if any (for a test to read which points were passed).
    pub fn faults(&self) -> Option<&FaultPlan> {
        self.faults.as_deref()
    }

    /// Pass the point named `point`, just before the write it names: what an armed plan
    /// injects there comes back as that write's error.
    pub(super) fn fault_point(&self, point: &'static str) -> std::io::Result<()> {
        match &self.faults {
            None => Ok(()),
            Some(plan) => plan.pass(point),
        }
    }
}
