//! `needle unpin REF`: gc may remove a pinned artifact again (once no kept run reaches it).

use needle_core::digest::is_hex_prefix;

use crate::cli::{Cli, UnpinArgs};
use crate::commands::open_existing;
use crate::error::{CliError, Exit};
use crate::refs::{artifact_of, resolve};

pub fn unpin(cli: &Cli, args: &UnpinArgs) -> Result<Exit, CliError> {
    let store = open_existing(cli)?;
    let text = &args.reference;
    // A pin's own digest first: a pinned artifact dropped as damaged has no manifest, so
    // the other references cannot find it.
    let prefix = text.to_ascii_lowercase();
    let pinned: Vec<_> = if is_hex_prefix(&prefix) && prefix.len() >= 4 {
        store
            .pins()?
            .into_iter()
            .filter(|(a, _)| a.hex().starts_with(&prefix))
            .collect()
    } else {
        Vec::new()
    };
    let artifact = match pinned.as_slice() {
        [(a, _)] => *a,
        [] => artifact_of(&store, &resolve(&store, text)?)?,
        many => {
            return Err(CliError::usage(format!(
                "`{text}` is ambiguous: it starts {} pinned artifacts (`needle pin` lists them)",
                many.len()
            )));
        }
    };
    if store.unpin(&artifact)? {
        println!(
            "unpinned {}: gc removes it once no kept run reaches it",
            artifact.short()
        );
        Ok(Exit::Success)
    } else {
        Err(CliError::usage(format!(
            "artifact `{}` is not pinned (`needle pin` lists the pins)",
            artifact.short()
        )))
    }
}
