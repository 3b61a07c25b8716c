//! Small helpers shared by backends.

pub mod command;
pub mod json_store;
pub mod xml;
