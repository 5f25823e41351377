//! End-to-end tests: they drive the real `needle` binary on temporary stores and check exit
//! codes, output, and what the steps themselves observed.

mod common;

mod bad_recipes;
mod builtin;
mod code_dirs;
mod concurrent;
mod crash;
mod curation;
mod disk_full;
mod docs;
mod doctor;
mod errors;
mod exec_env;
mod failures;
mod gc;
mod gpu_sharing;
mod gpu_usage;
mod inspect;
mod join;
mod lineage;
mod models;
mod rebuild;
mod remote;
mod repair;
mod report;
mod resources;
mod resume;
mod search;
mod sled_faults;
mod slurm;
mod snapshots;
mod store_access;
mod sweep;
mod verify;
mod why;
mod worker_failures;
