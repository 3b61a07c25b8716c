//! Small helpers shared by backends.

pub mod command;
pub mod xml;
