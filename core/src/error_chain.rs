//! An error with its causes, as text: what a reader who has only the text needs. Written once
//! for the store's socket, the commit thread, the CLI and the worker.

use std::error::Error;

/// `e` and each of its sources in turn, joined by `separator` (`": "` on one line,
/// `"\n  caused by: "` for a terminal). A cause whose words are already said is not said
/// again: some libraries' errors (`object_store`'s) put their source into their own message.
pub fn joined(e: &dyn Error, separator: &str) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let cause = s.to_string();
        if !text.contains(&cause) {
            text.push_str(separator);
            text.push_str(&cause);
        }
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

    #[test]
    fn a_cause_a_message_already_says_is_said_once() {
        let e = Wrapped(std::io::Error::other(Echo(std::io::Error::other(
            "disk on fire",
        ))));
        assert_eq!(
            super::joined(&e, ": "),
            "could not write: written: disk on fire"
        );
    }

    /// An error that says its source in its own message, as `object_store`'s do.
    #[derive(Debug)]
    struct Echo(std::io::Error);

    impl std::fmt::Display for Echo {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "written: {}", self.0)
        }
    }

    impl std::error::Error for Echo {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
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
