//! An error with its causes, as text: what a reader who has only the text needs. Written once
//! for the store's socket, the commit thread, the CLI and the worker.

use std::error::Error;

/// `e` and each of its sources in turn, joined by `separator` (`": "` on one line,
/// `"\n  caused by: "` for a terminal).
pub fn joined(e: &dyn Error, separator: &str) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(separator);
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_cause_is_said_in_order() {
        let e = Wrapped(std::io::Error::other("disk on fire"));
        assert_eq!(super::joined(&e, ": "), "could not write: disk on fire");
        assert_eq!(
            super::joined(&e, "\n  caused by: "),
            "could not write\n  caused by: disk on fire"
        );
    }

    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("could not write")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
