//! File writes that a crash, a kill or a full disk cannot tear: the checkpoints, the ledger,
//! status.json and the reports all go through here.

use anyhow::{Context, Result};
use std::path::Path;

/// Writes what `write` puts in a temporary file to `path` atomically: the temporary file beside
/// it, fsync, rename, fsync of the folder. A reader sees the old file or the new one, whole.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let temp = dir.join(format!(".{}.tmp", path.file_name().unwrap().to_string_lossy()));
    write(&temp)?;
    std::fs::File::open(&temp)?.sync_all()?;
    std::fs::rename(&temp, path).with_context(|| format!("renaming {} to {}", temp.display(), path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Writes `value` as pretty-printed JSON at `path`, atomically (status.json, the reports).
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    write_atomically(path, |temp| Ok(std::fs::write(temp, serde_json::to_vec_pretty(value)?)?))
}

/// Writes `image` as a PNG at `path`, atomically.
pub fn write_png(path: &Path, image: &image::RgbImage) -> Result<()> {
    write_atomically(path, |temp| {
        image
            .save_with_format(temp, image::ImageFormat::Png)
            .with_context(|| format!("{}: cannot write PNG", temp.display()))
    })
}
