//! The runtime directory: where FIFOs and bookkeeping live.
//!
//! Everything a binding exposes is a file in this directory, so it must be
//! ours alone: a directory another user owns or can write into would let
//! them read, inject or redirect data. It is created mode 0700 when
//! missing and refused (exit 77) when unsafe, whatever the umask.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::args::Id;
use crate::error::{Error, ExitStatus, Result};

/// The environment variable naming the runtime directory.
pub const ENV_DIR: &str = "FIFOBIND_DIR";

#[derive(Clone, Debug)]
pub struct RuntimeDir {
    path: PathBuf,
}

/// `$FIFOBIND_DIR`, else `$XDG_RUNTIME_DIR/fifobind`, else
/// `/tmp/fifobind-$UID`. Empty variables count as unset.
pub fn locate() -> PathBuf {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var(ENV_DIR) {
        return PathBuf::from(dir);
    }
    if let Some(xdg) = var("XDG_RUNTIME_DIR") {
        return Path::new(&xdg).join("fifobind");
    }
    PathBuf::from(format!("/tmp/fifobind-{}", nix::unistd::geteuid()))
}

impl RuntimeDir {
    /// The runtime directory the environment names, created if missing
    /// and checked.
    pub fn open() -> Result<RuntimeDir> {
        RuntimeDir::at(&locate())
    }

    pub fn at(path: &Path) -> Result<RuntimeDir> {
        // A relative path would change meaning once a daemon chdirs to /.
        let path = std::path::absolute(path)
            .map_err(|e| Error::io(format!("runtime directory {}", path.display()), &e))?;
        match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&path)
                    .map_err(|e| {
                        Error::io(
                            format!("cannot create runtime directory {}", path.display()),
                            &e,
                        )
                    })?;
                // The umask may have taken bits away, never added; make
                // the mode exact anyway.
                fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
                    .map_err(|e| Error::io(format!("runtime directory {}", path.display()), &e))?;
            }
            Err(e) => {
                return Err(Error::io(
                    format!("runtime directory {}", path.display()),
                    &e,
                ));
            }
            Ok(_) => {}
        }
        check_safe(&path)?;
        Ok(RuntimeDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The FIFO of binding `id`: exactly `<dir>/ID`.
    pub fn fifo(&self, id: &Id) -> PathBuf {
        self.path.join(id.as_str())
    }

    /// A bookkeeping file: a dot-name, which no ID can be.
    pub fn dotfile(&self, name: &str, suffix: &str) -> PathBuf {
        self.path.join(format!(".{name}.{suffix}"))
    }
}

fn check_safe(path: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(path)
        .map_err(|e| Error::io(format!("runtime directory {}", path.display()), &e))?;
    let refuse = |why: &str| {
        Err(Error::new(
            ExitStatus::NoPerm,
            format!("unsafe runtime directory {}: {why}", path.display()),
        ))
    };
    if meta.file_type().is_symlink() {
        return refuse("it is a symbolic link");
    }
    if !meta.is_dir() {
        return refuse("it is not a directory");
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return refuse(&format!("owned by uid {}, not by uid {me}", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return refuse(&format!(
            "mode {:04o} lets other users write into it",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_missing_directory_0700() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        RuntimeDir::at(&dir).unwrap();
        let mode = fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn refuses_group_writable_and_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o770)).unwrap();
        let err = RuntimeDir::at(&dir).unwrap_err();
        assert_eq!(err.status, ExitStatus::NoPerm);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let link = tmp.path().join("l");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert_eq!(
            RuntimeDir::at(&link).unwrap_err().status,
            ExitStatus::NoPerm
        );
        assert!(RuntimeDir::at(&dir).is_ok());
    }
}
