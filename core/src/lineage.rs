//! Lineage queries (placeholder).
