//! Takedowns.
