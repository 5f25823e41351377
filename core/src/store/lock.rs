//! The store's exclusive lock (placeholder).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Fail at once, naming the holder.
    Fail,
    /// Wait for the holder to finish.
    Wait,
}

pub(crate) struct StoreLock {
    #[allow(dead_code)]
    file: std::fs::File,
}
