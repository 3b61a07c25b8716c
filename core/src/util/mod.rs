//! Small helpers shared by backends and the layers above them: running tools under deadlines,
//! JSON stores written by rename, bind mounts, file tails, XML escaping. Internal to the crate.

pub(crate) mod bindmount;
pub(crate) mod cleanup;
pub(crate) mod command;
pub(crate) mod file_lock;
pub(crate) mod image;
pub(crate) mod json_store;
pub(crate) mod process;
pub(crate) mod replace;
pub mod shell;
pub(crate) mod tail;
pub(crate) mod tool;
pub(crate) mod xml;
