//! Sandbox (next commit).
