//! The Unix socket: a safe directory, stale-socket removal, permissions, and removal at exit.
//!
//! - The socket's directory is created with mode 0750 (owner + socket group) if missing. An
//!   existing directory must be a real directory (not a symlink) owned by the daemon's uid
//!   and not writable by group or others, or nobody else could be prevented from replacing
//!   the socket. Unless `socket_check_parents = false` (a Kubernetes `emptyDir`), every
//!   directory above it — on the configured path and on the path it resolves to — must be
//!   owned by root or the daemon's uid and not writable by group or others unless sticky
//!   (`/tmp`): whoever can write there could rename the socket's directory and put one of
//!   their own, with their own socket, in its place.
//! - An existing path is removed only if it is a socket nobody answers on (stale, left by a
//!   crash). A live socket (another daemon) or anything that is not a socket is refused.
//! - The socket gets mode 0660 and the configured group: only the owner and that group can
//!   connect. It is bound under a umask of 0117, so it is never wider than 0660, also before
//!   the `chmod` and in a directory that others may search; and bound under a temporary name
//!   (`.b` and 8 hex digits) in its directory, given its group and mode, then renamed into
//!   place (never over another file), so that nobody connects before it has its final group
//!   and mode. A crash between the bind and the rename leaves that hidden file behind (it is
//!   never removed by name: it may be another process's).
//! - One daemon per socket path: the daemon holds an exclusive lock on `.<socket name>.lock`
//!   next to the socket for its life, taken before a stale socket is checked and removed, so
//!   two daemons started at once cannot remove each other's fresh socket.
//! - At exit the socket is removed if it is still the one this process created.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use crate::error::DaemonError;

/// The bound socket; removes the path when dropped if it is still ours.
#[derive(Debug)]
pub struct BoundSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
    /// The socket's lock (see [`lock_socket`]), released after the socket is removed.
    _lock: std::fs::File,
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && meta.dev() == self.dev
            && meta.ino() == self.ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn socket_error(path: &Path, reason: impl Into<String>) -> DaemonError {
    DaemonError::Socket {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Resolves a group name or numeric gid.
pub fn resolve_group(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("cannot read /etc/group to resolve '{group}': {e}"))?;
    groups
        .lines()
        .filter_map(|line| {
            let mut parts = line.split(':');
            let name = parts.next()?;
            let gid = parts.nth(1)?.parse::<u32>().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .ok_or_else(|| format!("group '{group}' not found in /etc/group"))
}

/// Checks the directories above the socket's `dir` (see the module docs).
fn check_ancestors(path: &Path, dir: &Path, uid: u32) -> Result<(), DaemonError> {
    // Every directory the path goes through, following each symlink on it — those holding
    // the links of a chain (a -> b -> c) included, not only the configured path's and the
    // resolved one's: someone who can write to any of them can repoint the socket.
    let on_the_way = crate::config::directories_on_the_way(dir)
        .map_err(|e| socket_error(path, format!("cannot resolve {}: {e}", dir.display())))?;
    for ancestor in on_the_way.iter().map(PathBuf::as_path) {
        if ancestor.as_os_str().is_empty() {
            continue;
        }
        // Followed: a symlink on the configured path (/var/run -> /run) is judged by its
        // target, whose directories are on the list too.
        let meta = std::fs::metadata(ancestor)
            .map_err(|e| socket_error(path, format!("cannot stat {}: {e}", ancestor.display())))?;
        let mode = meta.permissions().mode() & 0o7777;
        let owner_ok = meta.uid() == 0 || meta.uid() == uid;
        let shared_writable = mode & 0o022 != 0 && mode & 0o1000 == 0;
        if !owner_ok || shared_writable {
            return Err(socket_error(
                path,
                format!(
                    "{} (above the socket's directory) is owned by uid {} with mode \
                     {mode:04o}: whoever can write there could rename the socket's directory \
                     and put their own socket in its place; put the socket under directories \
                     owned by root or the daemon (uid {uid}) and not writable by group or \
                     others (or sticky, like /tmp)",
                    ancestor.display(),
                    meta.uid()
                ),
            ));
        }
    }
    Ok(())
}

/// Creates (if missing) and checks the socket's directory, and with `check_parents` the
/// directories above it.
fn prepare_directory(
    path: &Path,
    dir: &Path,
    gid: Option<u32>,
    check_parents: bool,
) -> Result<(), DaemonError> {
    let uid = rustix::process::getuid().as_raw();
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|e| socket_error(path, format!("cannot create {}: {e}", dir.display())))?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(dir, None, Some(gid)).map_err(|e| {
                socket_error(
                    path,
                    format!("cannot set the group of {}: {e}", dir.display()),
                )
            })?;
        }
    }
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| socket_error(path, format!("cannot stat {}: {e}", dir.display())))?;
    if !meta.is_dir() {
        return Err(socket_error(
            path,
            format!(
                "{} is not a directory (symlinks are refused)",
                dir.display()
            ),
        ));
    }
    if meta.uid() != uid {
        return Err(socket_error(
            path,
            format!(
                "{} is owned by uid {}, not by the daemon (uid {uid}): use a directory the daemon owns",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        // A sticky directory (/tmp) is shared by design: never advise changing its mode.
        let fix = if mode & 0o1000 != 0 {
            "it is a shared directory: put the socket in a directory of its own (created by the \
             daemon's user, mode 0750 or stricter)"
                .to_owned()
        } else {
            format!(
                "if the directory is the daemon's own, run `chmod go-w {}`; else put the socket in \
                 a directory of its own",
                dir.display()
            )
        };
        return Err(socket_error(
            path,
            format!(
                "{} has mode {mode:04o}: group or others could replace the socket; {fix}",
                dir.display()
            ),
        ));
    }
    if check_parents {
        check_ancestors(path, dir, uid)?;
    }
    Ok(())
}

fn remove_stale(path: &Path) -> Result<(), DaemonError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    use std::os::unix::fs::FileTypeExt;
    if !meta.file_type().is_socket() {
        return Err(socket_error(
            path,
            "exists and is not a socket: refusing to remove it; move it away",
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(socket_error(
            path,
            "another daemon is listening on it: stop it first or choose another socket",
        )),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            tracing::info!(socket = %path.display(), "removing a stale socket left by an earlier run");
            std::fs::remove_file(path)
                .map_err(|e| socket_error(path, format!("cannot remove the stale socket: {e}")))
        }
        Err(e) => Err(socket_error(
            path,
            format!("exists and cannot be checked ({e}): refusing to remove it"),
        )),
    }
}

/// The socket's directory, created if missing and checked (see the module docs); its group.
fn socket_directory<'a>(
    path: &'a Path,
    group: Option<&str>,
    check_parents: bool,
) -> Result<(&'a Path, Option<u32>), DaemonError> {
    let gid = group
        .map(resolve_group)
        .transpose()
        .map_err(|e| socket_error(path, e))?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| socket_error(path, "must be an absolute path inside a directory"))?;
    prepare_directory(path, dir, gid, check_parents)?;
    Ok((dir, gid))
}

/// Checks the socket's directory (creating it if missing) before anything else starts;
/// [`bind`] checks it again.
pub fn check_directory(
    path: &Path,
    group: Option<&str>,
    check_parents: bool,
) -> Result<(), DaemonError> {
    socket_directory(path, group, check_parents).map(drop)
}

/// Binds the socket safely (see the module docs).
pub fn bind(
    path: &Path,
    group: Option<&str>,
    check_parents: bool,
) -> Result<(UnixListener, BoundSocket), DaemonError> {
    let (_, gid) = socket_directory(path, group, check_parents)?;
    let lock = lock_socket(path)?;
    remove_stale(path)?;
    // Bound under a temporary name in the same (checked, daemon-owned) directory, given its
    // group and mode, then renamed into place: nobody can connect to the socket before it
    // has its final group and mode.
    let staging = staging_path(path);
    if staging.as_os_str().len() > 107 {
        return Err(socket_error(
            path,
            format!(
                "the temporary name it is bound under, {}, is longer than a socket path may \
                 be (107 bytes): use a shorter socket path",
                staging.display()
            ),
        ));
    }
    // The umask is the process's: it is narrowed only around `bind` (which creates no
    // directory; files created meanwhile by other threads only get narrower modes).
    let umask = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o117));
    let bound = UnixListener::bind(&staging);
    rustix::process::umask(umask);
    // (An existing file at the temporary name fails the bind: it is never removed here, as
    // it may be another process's.)
    let listener =
        bound.map_err(|e| socket_error(path, format!("bind (as {}): {e}", staging.display())))?;
    let placed = (|| {
        if let Some(gid) = gid {
            std::os::unix::fs::chown(&staging, None, Some(gid))
                .map_err(|e| socket_error(path, format!("cannot set its group: {e}")))?;
        }
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o660))
            .map_err(|e| socket_error(path, format!("chmod 0660: {e}")))?;
        // The guard's identity, taken before the rename (which keeps the inode).
        let meta = std::fs::symlink_metadata(&staging)
            .map_err(|e| socket_error(path, format!("stat after bind: {e}")))?;
        // Never over a socket another daemon placed meanwhile.
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &staging,
            rustix::fs::CWD,
            path,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(|e| {
            let why = if e == rustix::io::Errno::EXIST {
                "something was placed there meanwhile (another daemon?)".to_owned()
            } else {
                format!(
                    "{e} (a file system without atomic no-replace renames? put the socket on \
                     a local file system such as /run)"
                )
            };
            socket_error(
                path,
                format!("cannot move the bound socket into place: {why}"),
            )
        })?;
        Ok(meta)
    })();
    let meta = match placed {
        Ok(meta) => meta,
        Err(e) => {
            let _ = std::fs::remove_file(&staging);
            return Err(e);
        }
    };
    let guard = BoundSocket {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
        _lock: lock,
    };
    Ok((listener, guard))
}

/// Takes the socket's lock, `.<socket name>.lock` next to it (mode 0600, kept after exit),
/// for the daemon's life: one daemon per socket path, so that checking for a stale socket,
/// removing it and placing the new one cannot interleave with another daemon's start.
fn lock_socket(path: &Path) -> Result<std::fs::File, DaemonError> {
    use rustix::fs::{FlockOperation, Mode, OFlags};
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let lock_path = path.with_file_name(format!(".{name}.lock"));
    let fd = rustix::fs::open(
        &lock_path,
        OFlags::CREATE | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| {
        socket_error(
            path,
            format!("cannot open its lock {}: {e}", lock_path.display()),
        )
    })?;
    match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(std::fs::File::from(fd)),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(socket_error(
            path,
            "another daemon is starting or listening on it (its lock is held): stop it first \
             or choose another socket",
        )),
        Err(e) => Err(socket_error(
            path,
            format!("cannot lock {}: {e}", lock_path.display()),
        )),
    }
}

/// The temporary name `bind` binds under, next to the socket: `.b` and 8 hex digits of the
/// process id and the clock (short: a socket path is limited to 107 bytes; distinct between
/// processes that share the directory, even with equal process ids in other containers).
fn staging_path(path: &Path) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tag = std::process::id().rotate_left(16) ^ nanos;
    path.with_file_name(format!(".b{tag:08x}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The umask is the process's: tests that create files or directories, or change it,
    /// run one at a time (`cargo test` runs a binary's tests on several threads).
    static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn umask_lock() -> std::sync::MutexGuard<'static, ()> {
        UMASK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[test]
    fn a_writable_socket_directory_is_refused_with_safe_advice() {
        let _umask = umask_lock();
        let dir = tempfile::tempdir().unwrap();
        let own = dir.path().join("own");
        let shared = dir.path().join("shared");
        for (d, mode) in [(&own, 0o770), (&shared, 0o1777)] {
            std::fs::create_dir(d).unwrap();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let err = prepare_directory(&own.join("d.sock"), &own, None, true).unwrap_err();
        assert!(err.to_string().contains("run `chmod go-w"), "{err}");
        // Never advise `chmod go-w /tmp`: a sticky directory is shared by design.
        let err = prepare_directory(&shared.join("d.sock"), &shared, None, true).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("mode 1777") && msg.contains("a directory of its own"),
            "{msg}"
        );
        assert!(!msg.contains("chmod"), "{msg}");
    }

    #[test]
    fn writable_directories_above_the_socket_are_refused_unless_sticky() {
        let _umask = umask_lock();
        let dir = tempfile::tempdir().unwrap();
        let outer = dir.path().join("outer");
        let run = outer.join("run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o750)).unwrap();
        let sock = run.join("d.sock");
        for (mode, refused) in [
            (0o777, true),
            (0o775, true),
            (0o755, false),
            (0o1777, false),
        ] {
            std::fs::set_permissions(&outer, std::fs::Permissions::from_mode(mode)).unwrap();
            let result = prepare_directory(&sock, &run, None, true);
            assert_eq!(result.is_err(), refused, "{mode:o}: {result:?}");
            if let Err(e) = result {
                let msg = e.to_string();
                assert!(
                    msg.contains(&outer.display().to_string()) && msg.contains("rename"),
                    "{msg}"
                );
            }
        }
        // Through a symlink: the directory holding the link, and the target's, are checked.
        std::fs::set_permissions(&outer, std::fs::Permissions::from_mode(0o777)).unwrap();
        // (Unless the configuration trusts them: socket_check_parents = false.)
        prepare_directory(&sock, &run, None, false).unwrap();
        let safe = dir.path().join("safe");
        std::fs::create_dir(&safe).unwrap();
        std::os::unix::fs::symlink(&outer, safe.join("link")).unwrap();
        let via_link = safe.join("link/run");
        assert!(prepare_directory(&via_link.join("d.sock"), &via_link, None, true).is_err());
        std::fs::set_permissions(&outer, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_directory(&via_link.join("d.sock"), &via_link, None, true).unwrap();
        // A chain of links: the directory holding the middle one is checked too (before:
        // only the configured path's and the resolved path's directories).
        let evil = dir.path().join("evil");
        std::fs::create_dir(&evil).unwrap();
        std::os::unix::fs::symlink(&outer, evil.join("l2")).unwrap();
        std::os::unix::fs::symlink(evil.join("l2"), safe.join("l1")).unwrap();
        let via_chain = safe.join("l1/run");
        std::fs::set_permissions(&evil, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_directory(&via_chain.join("d.sock"), &via_chain, None, true).unwrap();
        std::fs::set_permissions(&evil, std::fs::Permissions::from_mode(0o775)).unwrap();
        let err = prepare_directory(&via_chain.join("d.sock"), &via_chain, None, true).unwrap_err();
        assert!(
            err.to_string().contains(&evil.display().to_string()),
            "{err}"
        );
    }

    #[tokio::test]
    async fn bind_restores_the_umask_and_binds_0660_under_any() {
        let _umask = umask_lock();
        // Even with a permissive umask the socket is never wider than 0660.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/d.sock");
        let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0));
        let bound = bind(&path, None, true);
        let after = rustix::process::umask(old);
        let (_l, _g) = bound.unwrap();
        assert_eq!(after.bits(), 0, "bind restores the umask");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
    }

    #[tokio::test]
    async fn binds_0660_and_removes_at_drop() {
        let _umask = umask_lock();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/d.sock");
        let (listener, guard) = bind(&path, None, true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let dmode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dmode & 0o777, 0o750);
        // A second daemon on the same socket is refused while the first listens.
        let e = bind(&path, None, true).unwrap_err().to_string();
        assert!(e.contains("another daemon"), "{e}");
        drop(listener);
        drop(guard);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_daemon_holding_the_lock_keeps_its_socket_even_when_it_looks_stale() {
        let _umask = umask_lock();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/d.sock");
        let (listener, guard) = bind(&path, None, true).unwrap();
        // Not accepting (yet, or any more): to a stale check the socket looks stale. Another
        // start is refused by the lock, and leaves the socket in place.
        drop(listener);
        let e = bind(&path, None, true).unwrap_err().to_string();
        assert!(e.contains("its lock is held"), "{e}");
        assert!(path.exists());
        let lock = path.with_file_name(".d.sock.lock");
        let mode = std::fs::metadata(&lock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Once the first one is gone, the socket is free again.
        drop(guard);
        let (_l, _g) = bind(&path, None, true).unwrap();
    }

    #[tokio::test]
    async fn stale_socket_removed_other_files_refused() {
        let _umask = umask_lock();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        // A stale socket: bound, then its listener closed without removing the path.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let (_l, _g) = bind(&path, None, true).unwrap();
        drop((_l, _g));
        std::fs::write(&path, b"not a socket").unwrap();
        let e = bind(&path, None, true).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
    }

    #[tokio::test]
    async fn insecure_directory_refused() {
        let _umask = umask_lock();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = bind(&dir.path().join("d.sock"), None, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("could replace the socket"), "{e}");
        let link = dir.path().join("link");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = bind(&link.join("d.sock"), None, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("symlinks are refused"), "{e}");
    }
}
