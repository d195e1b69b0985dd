//! TAP mode (next commit).
