//! End-to-end tests: they drive the real `needle` binary on temporary stores and check exit
//! codes, output, and what the steps themselves observed.

mod common;

mod bad_recipes;
mod builtin;
mod crash;
mod curation;
mod doctor;
mod errors;
mod exec_env;
mod failures;
mod inspect;
mod lineage;
mod models;
mod report;
mod resources;
mod resume;
mod snapshots;
mod sweep;
mod verify;
mod why;
