//! One daemon per run directory: an exclusive lock on `<run dir>/lock`, held for the
//! daemon's life (the kernel drops it when the process dies, even by kill -9).

/// The run directory is held by another live daemon (whose pid the lock file names).
#[derive(Debug, thiserror::Error)]
#[error("{}: another daemon (pid {pid}) is running on this run directory", run_dir.display())]
pub struct AnotherDaemon {
    pub run_dir: std::path::PathBuf,
    pub pid: String,
}

use anyhow::{Context, Result};
use std::fs::File;
use std::path::Path;

pub struct RunLock {
    _file: File,
}

impl RunLock {
    pub fn acquire(run_dir: &Path) -> Result<RunLock> {
        std::fs::create_dir_all(run_dir)?;
        let path = run_dir.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open the lock file", path.display()))?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0)?;
                std::io::Write::write_all(&mut &file, format!("{}\n", std::process::id()).as_bytes())?;
                Ok(RunLock { _file: file })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let pid = std::fs::read_to_string(&path).unwrap_or_default().trim().to_string();
                Err(AnotherDaemon { run_dir: run_dir.to_path_buf(), pid }.into())
            }
            Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("{}: cannot lock", path.display())),
        }
    }

    /// Whether a daemon holds the run directory now.
    pub fn is_held(run_dir: &Path) -> bool {
        match File::options().write(true).open(run_dir.join("lock")) {
            Ok(file) => matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
            Err(_) => false,
        }
    }
}
