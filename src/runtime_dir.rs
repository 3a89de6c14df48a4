//! The runtime directory: where FIFOs and bookkeeping live.
//!
//! Everything a binding exposes is a file in this directory, so it must be
//! ours alone: a directory another user owns or can write into would let
//! them read, inject or redirect data. It is created mode 0700 when
//! missing and refused (exit 77) when unsafe, whatever the umask.
//!
//! Checking by path and then acting by path is a race in any directory
//! another user can write: between the two, a symbolic link can take the
//! directory's place, and a chmod by path then changes whatever it points
//! to. So only the last component is created (mkdirat in its parent), the
//! directory is opened `O_NOFOLLOW|O_DIRECTORY`, and owner and mode are
//! checked and fixed through that handle. Every parent is checked too, as
//! OpenSSH's StrictModes does: one that others may write into without the
//! sticky bit would let them rename our directory away and put their own
//! in its place, so it is refused. Under parents that pass, nobody but us
//! (and root) can replace the directory's entry, which is what makes the
//! paths below it safe to use afterwards.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{OFlag, open, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};

use crate::args::Id;
use crate::error::{Error, ExitStatus, Result};

/// The environment variable naming the runtime directory.
pub(crate) const ENV_DIR: &str = "FIFOBIND_DIR";

#[derive(Clone, Debug)]
pub(crate) struct RuntimeDir {
    path: PathBuf,
    /// The directory as checked, held so it stays the one we checked.
    _handle: Arc<OwnedFd>,
    /// Its device (as the check's fstat gave it), for the sweep's hint.
    dev: u64,
}

/// `$FIFOBIND_DIR`, else `$XDG_RUNTIME_DIR/fifobind`, else
/// `/tmp/fifobind-$UID`. Empty variables count as unset.
pub(crate) fn locate() -> PathBuf {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var(ENV_DIR) {
        return PathBuf::from(dir);
    }
    if let Some(xdg) = var("XDG_RUNTIME_DIR") {
        return Path::new(&xdg).join("fifobind");
    }
    PathBuf::from(format!("/tmp/fifobind-{}", nix::unistd::geteuid()))
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_CLOEXEC);

impl RuntimeDir {
    /// The runtime directory the environment names, created if missing
    /// and checked.
    pub(crate) fn open() -> Result<RuntimeDir> {
        RuntimeDir::at(&locate())
    }

    pub(crate) fn at(path: &Path) -> Result<RuntimeDir> {
        // A relative path would change meaning once a daemon chdirs to /.
        let path = std::path::absolute(path)
            .map_err(|e| Error::io(format!("runtime directory {}", path.display()), &e))?;
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(unsafe_dir(&path, "it is the root directory"));
        };
        check_parents(&path, parent)?;
        let parent_fd = open(parent, DIR_FLAGS, Mode::empty()).map_err(|e| {
            Error::io(
                format!(
                    "cannot open the parent of runtime directory {}",
                    path.display()
                ),
                &e.into(),
            )
        })?;
        let open_it = || {
            openat(
                &parent_fd,
                name,
                DIR_FLAGS | OFlag::O_NOFOLLOW,
                Mode::empty(),
            )
        };
        // Opened first: it exists on every start but the first, and a
        // mkdirat that fails with EEXIST would be a system call for
        // nothing.
        let mut created = false;
        let mut opened = open_it();
        if matches!(opened, Err(Errno::ENOENT)) {
            match mkdirat(&parent_fd, name, Mode::S_IRWXU) {
                Ok(()) => created = true,
                Err(Errno::EEXIST) => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("cannot create runtime directory {}", path.display()),
                        &e.into(),
                    ));
                }
            }
            opened = open_it();
        }
        let handle = match opened {
            Ok(fd) => fd,
            Err(Errno::ELOOP | Errno::ENOTDIR) => {
                // With O_DIRECTORY, a link in its place says ENOTDIR too.
                let link = fstatat(&parent_fd, name, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFLNK.bits());
                let why = if link {
                    "it is a symbolic link"
                } else {
                    "it is not a directory"
                };
                return Err(unsafe_dir(&path, why));
            }
            Err(e) => {
                return Err(Error::io(
                    format!("cannot open runtime directory {}", path.display()),
                    &e.into(),
                ));
            }
        };
        let stat = fstat(&handle)
            .map_err(|e| Error::io(format!("runtime directory {}", path.display()), &e.into()))?;
        check_owner_and_mode(&path, &stat, created)?;
        if created && stat.st_mode & 0o7777 != 0o700 {
            // The umask may have taken bits away, never added; make the
            // mode exact anyway, through the handle.
            fchmod(&handle, Mode::S_IRWXU).map_err(|e| {
                Error::io(format!("runtime directory {}", path.display()), &e.into())
            })?;
        }
        Ok(RuntimeDir {
            path,
            _handle: Arc::new(handle),
            dev: stat.st_dev,
        })
    }

    /// The device the directory is on.
    pub(crate) fn dev(&self) -> u64 {
        self.dev
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The FIFO of binding `id`: exactly `<dir>/ID`.
    pub(crate) fn fifo(&self, id: &Id) -> PathBuf {
        self.path.join(id.as_str())
    }

    /// A bookkeeping file: a dot-name, which no ID can be.
    pub(crate) fn dotfile(&self, name: &str, suffix: &str) -> PathBuf {
        self.path.join(format!(".{name}.{suffix}"))
    }
}

fn unsafe_dir(path: &Path, why: &str) -> Error {
    Error::new(
        ExitStatus::NoPerm,
        format!("unsafe runtime directory {}: {why}", path.display()),
    )
}

/// Ours, and nobody else may write into it.
fn check_owner_and_mode(path: &Path, stat: &FileStat, created: bool) -> Result<()> {
    if SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFDIR {
        return Err(unsafe_dir(path, "it is not a directory"));
    }
    let me = nix::unistd::geteuid().as_raw();
    if stat.st_uid != me {
        return Err(unsafe_dir(
            path,
            &format!("owned by uid {}, not by uid {me}", stat.st_uid),
        ));
    }
    if !created && stat.st_mode & 0o022 != 0 {
        return Err(unsafe_dir(
            path,
            &format!(
                "mode {:04o} lets other users write into it",
                stat.st_mode & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Every parent, from `/` down: none may be writable by others unless it
/// is sticky (like /tmp), and each must exist (only the last component is
/// created). Parents are owned by anyone: the check is what others can
/// do to the entries in them.
fn check_parents(path: &Path, parent: &Path) -> Result<()> {
    for dir in parent.ancestors() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new("/")
        } else {
            dir
        };
        let stat = nix::sys::stat::stat(dir).map_err(|e| {
            let what = if e == Errno::ENOENT {
                format!(
                    "cannot create runtime directory {}: its parent {} does not exist",
                    path.display(),
                    dir.display()
                )
            } else {
                format!(
                    "runtime directory {}: parent {}",
                    path.display(),
                    dir.display()
                )
            };
            Error::io(what, &e.into())
        })?;
        let sticky = stat.st_mode & 0o1000 != 0;
        if stat.st_mode & 0o002 != 0 && !sticky {
            return Err(unsafe_dir(
                path,
                &format!(
                    "its parent {} (mode {:04o}) lets any user replace it",
                    dir.display(),
                    stat.st_mode & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn creates_missing_directory_0700_last_component_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a");
        RuntimeDir::at(&dir).unwrap();
        let mode = fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let err = RuntimeDir::at(&tmp.path().join("x/y")).unwrap_err();
        assert!(err.message.contains("does not exist"), "{}", err.message);
        assert!(!tmp.path().join("x").exists());
    }

    #[test]
    fn refuses_a_parent_others_may_write_unless_sticky() {
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let err = RuntimeDir::at(&open.join("run")).unwrap_err();
        assert_eq!(err.status, ExitStatus::NoPerm);
        assert!(
            err.message.contains("lets any user replace it"),
            "{}",
            err.message
        );
        assert!(!open.join("run").exists(), "refused before creating");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(RuntimeDir::at(&open.join("run")).is_ok());
    }

    #[test]
    fn a_link_in_its_place_is_neither_followed_nor_chmodded() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("target");
        fs::create_dir(&target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        let link = tmp.path().join("run");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = RuntimeDir::at(&link).unwrap_err();
        assert!(err.message.contains("symbolic link"), "{}", err.message);
        assert_eq!(fs::metadata(&target).unwrap().mode() & 0o7777, 0o755);
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
