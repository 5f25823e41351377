//! `needle run --mps`: the run's GPU steps are clients of a CUDA MPS server of the run's own.
//!
//! Without MPS, the processes sharing a GPU take turns on it: each has its own context, and
//! the GPU time-slices between contexts. Under MPS their kernels run side by side, which is
//! what small steps sharing a GPU need to fill it. needle starts a control daemon
//! (`nvidia-cuda-mps-control -d`) with a private pipe and log directory, hands those to its GPU
//! steps (`CUDA_MPS_PIPE_DIRECTORY`, `CUDA_MPS_LOG_DIRECTORY`), and tells it to quit when the
//! run ends. The daemon is started without `CUDA_VISIBLE_DEVICES`, so it sees every GPU and a
//! client's device ids mean what they mean outside MPS (the daemon would otherwise renumber
//! them), and in PCI bus order, as needle's indices are. It carries the runner's reaper token:
//! a runner killed outright takes the daemon and its server with it.

use std::io::Write;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::process::find_on_path;

/// The program that starts and stops MPS.
pub const CONTROL: &str = "nvidia-cuda-mps-control";

/// Where the run's GPU steps find its MPS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpsDirs {
    pub pipe: PathBuf,
    pub log: PathBuf,
}

impl MpsDirs {
    /// The variables a client needs.
    pub fn env(&self) -> [(&'static str, &PathBuf); 2] {
        [
            ("CUDA_MPS_PIPE_DIRECTORY", &self.pipe),
            ("CUDA_MPS_LOG_DIRECTORY", &self.log),
        ]
    }
}

/// A running MPS control daemon, told to quit when dropped.
#[derive(Debug)]
pub struct Mps {
    control: PathBuf,
    dirs: MpsDirs,
    _dir: tempfile::TempDir,
}

/// Why `--mps` could not start its daemon: the run does not start.
#[derive(Debug, thiserror::Error)]
pub enum MpsError {
    #[error(
        "--mps needs `{CONTROL}`, which is not on PATH (it comes with NVIDIA's driver; \
         without it, steps sharing a GPU take turns on it)"
    )]
    NotOnPath,
    #[error("--mps: could not create its directory")]
    TempDir(#[source] std::io::Error),
    #[error("--mps: could not create `{}`", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--mps: could not start `{}`", control.display())]
    Spawn {
        control: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The daemon refused: what it said on stderr, and in its log.
    #[error("--mps: `{CONTROL} -d` {status}: {said}")]
    Refused {
        status: std::process::ExitStatus,
        said: String,
    },
}

impl Mps {
    pub fn start() -> Result<Mps, MpsError> {
        let control = find_on_path(CONTROL).ok_or(MpsError::NotOnPath)?;
        // Short and private: the pipe directory holds unix sockets, whose paths are limited
        // to 107 bytes.
        let dir = tempfile::Builder::new()
            .prefix("needle-mps-")
            .tempdir()
            .map_err(MpsError::TempDir)?;
        let dirs = MpsDirs {
            pipe: dir.path().join("pipe"),
            log: dir.path().join("log"),
        };
        for d in [&dirs.pipe, &dirs.log] {
            std::fs::create_dir(d).map_err(|source| MpsError::CreateDir {
                path: d.clone(),
                source,
            })?;
        }
        // The daemon must die with a killed runner like a step does.
        crate::reaper::ready();
        let out = Command::new(&control)
            .arg("-d")
            .envs(dirs.env())
            .env_remove("CUDA_VISIBLE_DEVICES")
            .env("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
            .env(crate::reaper::ENV, crate::reaper::token())
            .stdin(Stdio::null())
            .process_group(0)
            .output();
        let out = match out {
            Ok(out) => out,
            Err(source) => return Err(MpsError::Spawn { control, source }),
        };
        if !out.status.success() {
            let said = String::from_utf8_lossy(&out.stderr);
            let log = std::fs::read_to_string(dirs.log.join("control.log")).unwrap_or_default();
            return Err(MpsError::Refused {
                status: out.status,
                said: [said.trim(), log.trim()]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
        Ok(Mps {
            control,
            dirs,
            _dir: dir,
        })
    }

    pub fn dirs(&self) -> &MpsDirs {
        &self.dirs
    }
}

impl Drop for Mps {
    fn drop(&mut self) {
        let quit = Command::new(&self.control)
            .envs(self.dirs.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .and_then(|mut child| {
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(b"quit\n")?;
                }
                child.wait()
            });
        if let Err(e) = quit {
            tracing::warn!("could not stop the run's MPS daemon: {e}");
        }
    }
}
