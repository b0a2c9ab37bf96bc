//! Containment by construction: every path under a vfolder is resolved by the kernel
//! from a directory descriptor (`openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_MAGICLINKS`, plus `RESOLVE_NO_SYMLINKS` where a link must never be
//! followed), and every operation works on descriptors (`*at` calls) from there. A
//! symlink inside a vfolder may be followed only while it stays beneath the vfolder;
//! walks (archives, copies, recursive deletes, usage, cleanup) never follow one.
//! Directories swapped for symlinks while a request runs cannot redirect it: the
//! kernel checks containment during the resolution itself, not before it.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags};

use super::volume::PathError;

/// Containment for resolving a client path: inner symlinks allowed, never out.
pub const BENEATH: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);
/// Containment where no symlink may be followed at all.
pub const STRICT: ResolveFlags = BENEATH.union(ResolveFlags::NO_SYMLINKS);
/// Flags of a directory descriptor that can be read and used as a `dirfd`.
pub const DIR: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC);

/// Splits a client path into plain components; refuses absolute paths, `..` and NUL.
/// An empty result is the vfolder itself.
pub fn components(rel: &str) -> Result<Vec<OsString>, PathError> {
    if rel.as_bytes().contains(&0) {
        return Err(PathError::Escape);
    }
    let mut out = Vec::new();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(part) => out.push(part.to_owned()),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(PathError::Escape)
            }
        }
    }
    Ok(out)
}

/// The components joined as a relative path (`.` for none).
pub fn join(parts: &[OsString]) -> PathBuf {
    if parts.is_empty() {
        return PathBuf::from(".");
    }
    parts.iter().collect()
}

/// Opens `parts` beneath `root` with the given flags and containment.
pub fn open(
    root: BorrowedFd<'_>,
    parts: &[OsString],
    flags: OFlags,
    resolve: ResolveFlags,
) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat2(
        root,
        join(parts).as_path(),
        flags | OFlags::CLOEXEC,
        Mode::empty(),
        resolve,
    )?)
}

/// Opens a directory beneath `root` (inner symlinks followed, never out).
pub fn open_dir(root: BorrowedFd<'_>, parts: &[OsString]) -> io::Result<OwnedFd> {
    open(root, parts, DIR, BENEATH)
}

/// Opens the child directory `name` of `dir` without following a symlink.
pub fn child_dir(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    match rustix::fs::openat2(dir, name, DIR | OFlags::NOFOLLOW, Mode::empty(), STRICT) {
        Ok(fd) => Ok(fd),
        // `O_DIRECTORY | O_NOFOLLOW` on a symlink says ENOTDIR: report the link.
        Err(rustix::io::Errno::NOTDIR)
            if rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Symlink) =>
        {
            Err(rustix::io::Errno::LOOP.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Opens the regular file `name` of `dir` for reading without following a symlink
/// (and without blocking on a FIFO); anything but a regular file is refused.
pub fn child_file(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<std::fs::File> {
    let fd = rustix::fs::openat2(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
        STRICT,
    )?;
    if FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) != FileType::RegularFile {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a file"));
    }
    Ok(std::fs::File::from(fd))
}

/// A directory descriptor and a name in it: where a mutation happens.
pub struct Parent {
    /// The parent directory.
    pub dir: OwnedFd,
    /// The last component.
    pub name: OsString,
}

/// Opens the parent of `parts` beneath `root`; the last component itself is not
/// resolved, so operations on it act on a symlink, never through it.
pub fn parent(root: BorrowedFd<'_>, parts: &[OsString]) -> io::Result<Parent> {
    let Some((name, dirs)) = parts.split_last() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the vfolder itself",
        ));
    };
    Ok(Parent {
        dir: open_dir(root, dirs)?,
        name: name.clone(),
    })
}

/// Creates every missing directory of `parts` beneath `root` and returns the last
/// one. Each step is resolved from `root` by the kernel, so a component swapped for
/// an outward symlink stops the walk instead of creating anything outside.
pub fn mkdirs(
    root: BorrowedFd<'_>,
    parts: &[OsString],
    resolve: ResolveFlags,
) -> io::Result<OwnedFd> {
    let mut cur = open(root, &[], DIR, resolve)?;
    for i in 0..parts.len() {
        let step = open(root, &parts[..=i], DIR, resolve);
        cur = match step {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match rustix::fs::mkdirat(&cur, parts[i].as_os_str(), Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                child_dir(cur.as_fd(), &parts[i])?
            }
            Err(e) => return Err(e),
        };
    }
    Ok(cur)
}

/// One entry of a directory, not followed.
pub struct Entry {
    /// Its name.
    pub name: OsString,
    /// Its status (`AT_SYMLINK_NOFOLLOW`).
    pub stat: rustix::fs::Stat,
}

impl Entry {
    /// The entry's type.
    pub fn kind(&self) -> FileType {
        FileType::from_raw_mode(self.stat.st_mode)
    }
}

/// The entries of a directory (without `.` and `..`), sorted by name; an entry that
/// vanishes while listed is left out.
pub fn entries(dir: BorrowedFd<'_>) -> io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    for e in Dir::read_from(dir)? {
        let e = e?;
        let name = OsStr::from_bytes(e.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => out.push(Entry {
                name: name.to_owned(),
                stat,
            }),
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Removes `name` in `dir`: a directory with everything under it, anything else
/// (symlinks included) by unlinking the entry itself. Returns the entries removed.
pub fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<u64> {
    match child_dir(dir, name) {
        Ok(sub) => {
            let mut n = 0;
            for e in entries(sub.as_fd())? {
                n += remove_tree(sub.as_fd(), &e.name)?;
            }
            drop(sub);
            rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
            Ok(n + 1)
        }
        // A symlink (ELOOP) or a non-directory (ENOTDIR): the entry itself goes.
        Err(e)
            if matches!(e.raw_os_error(), Some(c) if c == rustix::io::Errno::LOOP.raw_os_error()
                || c == rustix::io::Errno::NOTDIR.raw_os_error()) =>
        {
            rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
            Ok(1)
        }
        Err(e) => Err(e),
    }
}

/// Files and bytes under `dir` (symlinks not followed), descending only into
/// directories `descend` accepts.
pub fn usage(dir: BorrowedFd<'_>, descend: &dyn Fn(&Entry) -> bool) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    let Ok(list) = entries(dir) else {
        return (0, 0);
    };
    for e in list {
        if e.kind() == FileType::Directory {
            if descend(&e) {
                if let Ok(sub) = child_dir(dir, &e.name) {
                    let (f, b) = usage(sub.as_fd(), descend);
                    files += f;
                    bytes += b;
                }
            }
        } else {
            files += 1;
            bytes += e.stat.st_size as u64;
        }
    }
    (files, bytes)
}

/// Copies the regular files and directories under `src` into `dst` (symlinks are
/// neither followed nor copied); `skip` names top-level entries left out. Calls
/// `on_dir` for every directory copied. Returns the files copied.
pub fn copy_tree(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    skip: &[&str],
    on_dir: &mut dyn FnMut(),
) -> io::Result<u64> {
    let mut n = 0;
    for e in entries(src)? {
        if skip.iter().any(|s| e.name == *s) {
            continue;
        }
        match e.kind() {
            FileType::Directory => {
                let Ok(from) = child_dir(src, &e.name) else {
                    continue;
                };
                match rustix::fs::mkdirat(dst, e.name.as_os_str(), Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                let to = child_dir(dst, &e.name)?;
                n += copy_tree(from.as_fd(), to.as_fd(), &[], on_dir)?;
            }
            FileType::RegularFile => {
                let Ok(mut from) = child_file(src, &e.name) else {
                    continue;
                };
                let to = rustix::fs::openat2(
                    dst,
                    e.name.as_os_str(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(e.stat.st_mode & 0o777),
                    STRICT,
                )?;
                let mut to = std::fs::File::from(to);
                io::copy(&mut from, &mut to)?;
                n += 1;
            }
            _ => {}
        }
    }
    on_dir();
    Ok(n)
}

/// `fsync` of a descriptor.
pub fn sync(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::fs::fsync(fd)?)
}

/// Whether an error means the kernel refused to leave the directory (or to follow a
/// symlink where none may be followed).
pub fn is_escape(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error())
        || e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd(p: &Path) -> OwnedFd {
        rustix::fs::open(p, DIR, Mode::empty()).expect("open")
    }

    #[test]
    fn outward_symlinks_are_refused_by_the_kernel() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("outside");
        std::fs::write(outside.path().join("secret"), "s").expect("secret");
        std::fs::create_dir(dir.path().join("sub")).expect("sub");
        std::fs::write(dir.path().join("sub/f"), "f").expect("f");
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).expect("link");
        std::os::unix::fs::symlink("sub", dir.path().join("inner")).expect("link");
        let root = fd(dir.path());
        let p = |s: &str| components(s).expect("parts");
        let e = open(root.as_fd(), &p("out/secret"), OFlags::RDONLY, BENEATH).expect_err("out");
        assert!(is_escape(&e), "{e}");
        assert!(open(root.as_fd(), &p("inner/f"), OFlags::RDONLY, BENEATH).is_ok());
        assert!(is_escape(
            &open(root.as_fd(), &p("inner/f"), OFlags::RDONLY, STRICT).expect_err("strict")
        ));
        assert!(components("../x").is_err() && components("/etc").is_err());
        let e = mkdirs(root.as_fd(), &p("out/new/dir"), BENEATH).expect_err("out");
        assert!(is_escape(&e));
        assert!(!outside.path().join("new").exists());
        // Removing a symlink removes the link, never what it points at.
        assert_eq!(remove_tree(root.as_fd(), OsStr::new("out")).expect("rm"), 1);
        assert!(outside.path().join("secret").exists());
    }
}
