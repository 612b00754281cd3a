//! An output file that appears under its name only when complete: written to
//! `OUTPUT.partial` (mode 0600), fsynced, and linked to `OUTPUT` (never overwriting a file
//! there) by [`Partial::commit`]; removed on any failure (dropped without a commit).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::CliError;

/// The output file being written, removed unless [`Partial::commit`] ran.
pub(crate) struct Partial {
    path: PathBuf,
    target: PathBuf,
    file: Option<File>,
}

impl Partial {
    /// Starts `target`, which must not exist (not even as a dangling symlink).
    pub(crate) fn create(target: &Path) -> Result<Partial, CliError> {
        if std::fs::symlink_metadata(target).is_ok() {
            return Err(CliError::Usage(format!(
                "{} exists: refusing to overwrite it",
                target.display()
            )));
        }
        let mut name = target.as_os_str().to_owned();
        name.push(".partial");
        let path = PathBuf::from(name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => CliError::Usage(format!(
                    "{} exists: an earlier run was interrupted (SIGKILL, a crash) or is still \
                     running; once none runs, remove it (it holds an incomplete output) and run \
                     again",
                    path.display()
                )),
                _ => CliError::io(format!("creating {}", path.display()))(e),
            })?;
        Ok(Partial {
            path,
            target: target.to_owned(),
            file: Some(file),
        })
    }

    /// The temporary name it is written under (`OUTPUT.partial`).
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `bytes`.
    pub(crate) fn append(&mut self, bytes: &[u8]) -> Result<(), CliError> {
        match &mut self.file {
            Some(file) => file
                .write_all(bytes)
                .map_err(CliError::io(format!("writing {}", self.path.display()))),
            None => Ok(()),
        }
    }

    /// fsync, then link to the target — which fails if a file appeared there meanwhile
    /// (never overwritten) — then remove the partial name and fsync the directory.
    pub(crate) fn commit(mut self) -> Result<(), CliError> {
        if let Some(file) = self.file.take() {
            file.sync_all()
                .map_err(CliError::io(format!("syncing {}", self.path.display())))?;
        }
        std::fs::hard_link(&self.path, &self.target).map_err(CliError::io(format!(
            "moving {} to {} (which must not exist)",
            self.path.display(),
            self.target.display()
        )))?;
        let _ = std::fs::remove_file(&self.path);
        self.path.clear();
        let dir = match self.target.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(CliError::io(format!("syncing directory {}", dir.display())))
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            self.file = None;
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Write for Partial {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match &mut self.file {
            Some(file) => file.write(bytes),
            None => Ok(bytes.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.file {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

/// Installs SIGINT, SIGTERM and SIGHUP handlers now (so that no signal from here on is
/// missed: a handler created later would not see it) and resolves on any of them (never, if
/// they cannot be installed). SIGHUP: a terminal or SSH session that goes away must not leave
/// the `.partial` file behind.
pub(crate) fn interruption() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    );
    async move {
        match handlers {
            (Ok(mut int), Ok(mut term), Ok(mut hup)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                    _ = hup.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    }
}
