//! Small helpers shared by backends.

pub mod bindmount;
pub mod command;
pub mod json_store;
pub mod tail;
pub mod xml;
