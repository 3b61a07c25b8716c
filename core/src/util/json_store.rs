//! A JSON file updated under an exclusive file lock, so threads and processes see one state
//! (port leases, the VMware inventory). Writes go through a temp file and rename.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Ctx, Error, Result};

#[derive(Debug, Clone)]
pub struct JsonStore {
    dir: PathBuf,
    name: String,
}

impl JsonStore {
    /// `<dir>/<name>.json`, locked through `<dir>/<name>.lock`.
    pub fn new(dir: impl Into<PathBuf>, name: &str) -> Self {
        JsonStore {
            dir: dir.into(),
            name: name.to_string(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(format!("{}.json", self.name))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Run `f` on the stored value under the lock; the value is saved if `f` returns `Ok(true, _)`.
    pub fn update<T, R>(&self, ctx: &Ctx, f: impl FnOnce(&mut T) -> Result<(bool, R)>) -> Result<R>
    where
        T: Default + Serialize + DeserializeOwned,
    {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(ctx.clone(), &self.dir, e))?;
        let lock_path = self.dir.join(format!("{}.lock", self.name));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(ctx.clone(), &lock_path, e))?;
        lock.lock()
            .map_err(|e| Error::io(ctx.clone(), &lock_path, e))?;
        let path = self.path();
        let mut value: T = match File::open(&path) {
            Ok(mut file) => {
                let mut s = String::new();
                file.read_to_string(&mut s)
                    .map_err(|e| Error::io(ctx.clone(), &path, e))?;
                if s.trim().is_empty() {
                    T::default()
                } else {
                    serde_json::from_str(&s).map_err(|e| {
                        Error::backend(
                            ctx.clone(),
                            "anyvm",
                            format!(
                                "{} is corrupt ({e}); move it aside to reset it",
                                path.display()
                            ),
                        )
                    })?
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => T::default(),
            Err(e) => return Err(Error::io(ctx.clone(), &path, e)),
        };
        let (changed, out) = f(&mut value)?;
        if changed {
            let tmp = path.with_extension("json.tmp");
            let data = serde_json::to_vec_pretty(&value).expect("store serializes");
            let write = || -> std::io::Result<()> {
                let mut file = File::create(&tmp)?;
                file.write_all(&data)?;
                file.sync_all()?;
                std::fs::rename(&tmp, &path)
            };
            if let Err(e) = write() {
                // A full disk must not leave a half-written temp file behind.
                let _ = std::fs::remove_file(&tmp);
                return Err(Error::io(ctx.clone(), &path, e));
            }
        }
        Ok(out)
    }

    /// Read the stored value under the lock.
    pub fn read<T>(&self, ctx: &Ctx) -> Result<T>
    where
        T: Default + Serialize + DeserializeOwned + Clone,
    {
        self.update(ctx, |v: &mut T| Ok((false, v.clone())))
    }
}
