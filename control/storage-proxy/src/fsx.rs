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

/// The most bytes of one file name (`NAME_MAX` of the Linux file systems).
pub const NAME_MAX: usize = 255;

/// The most bytes of a path the proxy makes within a vfolder (its components and
/// the `/` between them): `PATH_MAX` less its terminating NUL ([`to_make`]).
pub const PATH_MAX: usize = 4095;

/// `parts`, a path the proxy is to make (an upload's destination, `mkdir`, the new
/// path of a move or rename), refused when it is longer than [`PATH_MAX`]. Making a
/// path goes a component at a time ([`mkdirs_checked`]), so the kernel's own limit
/// did not apply to it: an upload's `dst_dir` of 65 KB made 32,577 nested
/// directories for one empty file, under which nothing could be opened again,
/// by the proxy ([`open`] resolves a path whole, within `PATH_MAX`) or by any tool.
/// A deeper tree a user made from a shell is reached through an ancestor within
/// the limit (archived, measured, deleted whole).
pub fn to_make(parts: Vec<OsString>) -> Result<Vec<OsString>, PathError> {
    let len = parts
        .iter()
        .map(|p| p.len() + 1)
        .sum::<usize>()
        .saturating_sub(1);
    if len > PATH_MAX {
        return Err(PathError::PathTooLong(len));
    }
    Ok(parts)
}

/// Splits a client path into plain components; refuses absolute paths, `..` and NUL,
/// and a component longer than [`NAME_MAX`] bytes, which no file system takes: every
/// route refuses such a path before it acts (an upload before it reserves anything),
/// never when the kernel says `ENAMETOOLONG` at the end. An empty result is the
/// vfolder itself.
pub fn components(rel: impl AsRef<OsStr>) -> Result<Vec<OsString>, PathError> {
    let rel = rel.as_ref();
    if rel.as_bytes().contains(&0) {
        return Err(PathError::Escape);
    }
    let mut out = Vec::new();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(part) if part.len() > NAME_MAX => {
                return Err(PathError::NameTooLong(part.len()))
            }
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

/// How many times [`openat2`] tries again on `EAGAIN`.
const OPENAT2_TRIES: usize = 32;

/// `openat2`, tried again when the kernel says `EAGAIN`: a resolution through `..`
/// under `RESOLVE_BENEATH` fails so whenever any rename or mount anywhere on the host
/// happened meanwhile (the kernel's global `rename_lock`/`mount_lock` moved), and
/// `openat2(2)` says to retry. Without this, a path through a relative symlink
/// (`results/latest -> ../runs/42`) fails at random while another user renames
/// files. Bounded, with a yield between tries, so a host renaming without pause
/// still gets an answer (the last `EAGAIN`).
pub fn openat2<P: rustix::path::Arg + Copy>(
    dir: impl AsFd,
    path: P,
    flags: OFlags,
    mode: Mode,
    resolve: ResolveFlags,
) -> rustix::io::Result<OwnedFd> {
    let mut tries = 1;
    loop {
        match rustix::fs::openat2(dir.as_fd(), path, flags, mode, resolve) {
            Err(rustix::io::Errno::AGAIN) if tries < OPENAT2_TRIES => {
                tries += 1;
                std::thread::yield_now();
            }
            r => return r,
        }
    }
}

/// Opens `parts` beneath `root` with the given flags and containment. A resolution
/// that may follow symlinks is charged to the work's [`RESOLVE_BUDGET`] (see
/// [`resolving`]).
pub fn open(
    root: BorrowedFd<'_>,
    parts: &[OsString],
    flags: OFlags,
    resolve: ResolveFlags,
) -> io::Result<OwnedFd> {
    #[cfg(test)]
    tests::RESOLUTIONS.with(|n| n.set(n.get() + 1));
    let once = || {
        Ok(openat2(
            root,
            join(parts).as_path(),
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            resolve,
        )?)
    };
    if resolve.contains(ResolveFlags::NO_SYMLINKS) {
        // No link followed: the kernel's work is bounded by the path's own length.
        once()
    } else {
        charged(once)
    }
}

/// The most CPU time the path resolutions that may follow symlinks take in one
/// piece of a request's blocking work ([`resolving`]): what the kernel spends
/// walking a user's links is charged, measured on the thread's CPU clock, and once
/// it is spent the next such resolution fails with [`LinksTooCostly`] (400, naming
/// this limit). The kernel bounds one resolution (40 links, each target under 4 KB)
/// but not what a link's target holds: 38 nested links of `a/../a/…` targets make
/// some 76,000 components, 10 ms of kernel time for each path through them, and an
/// archive token lists thousands of paths (38 CPU-seconds a download). A path
/// through ordinary links costs a few microseconds: a token's 4,600 paths spend
/// some 1 % of this.
pub const RESOLVE_BUDGET: std::time::Duration = std::time::Duration::from_secs(1);

thread_local! {
    /// What the current work may still spend on resolutions through links; `None`
    /// outside [`resolving`] (background jobs, whose paths are the proxy's own).
    static RESOLVING: std::cell::Cell<Option<std::time::Duration>> =
        const { std::cell::Cell::new(None) };
}

/// Runs `f` with a fresh [`RESOLVE_BUDGET`] on this thread (the previous one, if
/// any, back afterwards): every request's blocking work runs in one.
pub fn resolving<T>(f: impl FnOnce() -> T) -> T {
    resolving_with(RESOLVE_BUDGET, f)
}

/// [`resolving`] with a budget of `budget` (tests).
pub fn resolving_with<T>(budget: std::time::Duration, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<std::time::Duration>);
    impl Drop for Restore {
        fn drop(&mut self) {
            RESOLVING.with(|r| r.set(self.0));
        }
    }
    let _restore = Restore(RESOLVING.with(|r| r.replace(Some(budget))));
    f()
}

/// This thread's CPU time so far (user and system: the kernel's path walk is
/// system time).
fn thread_cpu() -> std::time::Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    std::time::Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// Runs the resolution `f`, charging its CPU time to the thread's budget; refused
/// without running once the budget is spent (the last one may pass it by one
/// resolution, at most some 10 ms).
fn charged<T>(f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    let Some(left) = RESOLVING.with(|r| r.get()) else {
        return f();
    };
    if left.is_zero() {
        return Err(io::Error::other(LinksTooCostly));
    }
    let start = thread_cpu();
    let r = f();
    let spent = thread_cpu().saturating_sub(start);
    RESOLVING.with(|r| r.set(Some(left.saturating_sub(spent))));
    r
}

/// The error of work whose resolutions through symlinks spent their
/// [`RESOLVE_BUDGET`].
#[derive(Debug)]
pub struct LinksTooCostly;

impl std::fmt::Display for LinksTooCostly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the paths of this request go through symlinks too costly to resolve: their resolution took more than the {} ms of CPU a request may spend on it (the storage-proxy's path resolution budget); name the files by paths with fewer or simpler links, or fewer paths at once",
            RESOLVE_BUDGET.as_millis()
        )
    }
}

impl std::error::Error for LinksTooCostly {}

/// Opens a directory beneath `root` (inner symlinks followed, never out).
pub fn open_dir(root: BorrowedFd<'_>, parts: &[OsString]) -> io::Result<OwnedFd> {
    open(root, parts, DIR, BENEATH)
}

/// Opens the child directory `name` of `dir` without following a symlink.
pub fn child_dir(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    match openat2(dir, name, DIR | OFlags::NOFOLLOW, Mode::empty(), STRICT) {
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

/// The deepest directory of `parts` beneath `root` that exists, with how many of
/// `parts` lead to it. Walked down a level at a time: a plain directory is one step
/// from the last level, and only a symlink is resolved from `root` again, by the
/// kernel (inner links followed, never out). Trying each prefix from the deepest
/// up, as a destination check did, resolved a costly prefix (a user's nested
/// links) once per missing level below it: 2,000 missing levels under one cost 6
/// CPU-seconds for one request.
pub fn deepest_dir(root: BorrowedFd<'_>, parts: &[OsString]) -> io::Result<(OwnedFd, usize)> {
    let mut cur = open(root, &[], DIR, BENEATH)?;
    for i in 0..parts.len() {
        let step = match child_dir(cur.as_fd(), &parts[i]) {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
                open_dir(root, &parts[..=i])
            }
            step => step,
        };
        match step {
            Ok(fd) => cur = fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((cur, i)),
            Err(e) => return Err(e),
        }
    }
    Ok((cur, parts.len()))
}

/// Opens the regular file `name` of `dir` for reading without following a symlink;
/// anything but a regular file is refused without being opened (see [`readable`]).
pub fn child_file(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<std::fs::File> {
    let path = openat2(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        STRICT,
    )?;
    let fd = readable(path, false, || {
        Ok(openat2(
            dir,
            name,
            READ | OFlags::NOFOLLOW,
            Mode::empty(),
            STRICT,
        )?)
    })?;
    Ok(std::fs::File::from(fd))
}

/// Flags of a descriptor opened to read a file or list a directory: never waiting
/// (a FIFO), never becoming the controlling terminal.
const READ: OFlags = OFlags::RDONLY
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);

/// Opens for reading what the `O_PATH` descriptor `path` names, when it is a regular
/// file (or, with `dirs`, a directory); anything else is refused (`InvalidInput`)
/// without ever being opened. A user who can make special files in a vfolder (a
/// container with `CAP_MKNOD`, a volume without `nodev`) could otherwise have the
/// proxy open a device node, and opening some devices acts (a watchdog arms, a
/// terminal becomes the controlling one, a tape rewinds). The reopening goes
/// through `/proc/self/fd`, so it is the very inode that was checked; without
/// `/proc`, `again` resolves it again and it must be the same inode.
pub fn readable(
    path: OwnedFd,
    dirs: bool,
    again: impl FnOnce() -> io::Result<OwnedFd>,
) -> io::Result<OwnedFd> {
    reopen(path, READ, dirs, again)
}

/// Opens what the `O_PATH` descriptor `path` names with `flags`, as [`readable`]
/// does: a regular file (or, with `dirs`, a directory), nothing else ever opened.
pub fn reopen(
    path: OwnedFd,
    flags: OFlags,
    dirs: bool,
    again: impl FnOnce() -> io::Result<OwnedFd>,
) -> io::Result<OwnedFd> {
    let st = rustix::fs::fstat(&path)?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => {}
        FileType::Directory if dirs => {}
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or directory",
            ))
        }
    }
    let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&path));
    let fd = match rustix::fs::open(link.as_str(), flags | OFlags::CLOEXEC, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => again()?,
        Err(e) => return Err(e.into()),
    };
    if identity(fd.as_fd())? != (st.st_dev as u64, st.st_ino as u64) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "replaced while it was opened",
        ));
    }
    Ok(fd)
}

/// Opens `parts` beneath `root` for reading (inner symlinks followed, never out): a
/// regular file or a directory, anything else refused without being opened.
pub fn open_readable(root: BorrowedFd<'_>, parts: &[OsString]) -> io::Result<OwnedFd> {
    let path = open(root, parts, OFlags::PATH, BENEATH)?;
    readable(path, true, || open(root, parts, READ, BENEATH))
}

/// What a path beneath a vfolder names, found by [`locate`].
pub struct Located {
    /// An `O_PATH` descriptor of it (never opened for reading yet).
    pub path: OwnedFd,
    /// The directory it is an entry of and its name there (never a symlink), or
    /// `None` for the vfolder itself (a path naming it, or a symlink leading to it).
    pub parent: Option<Parent>,
}

/// Resolves `parts` beneath `root` as [`open_readable`] does (inner symlinks
/// followed, never out), and finds what the path names as an entry of a directory
/// descriptor: a regular file has no `..` to climb, and the read routes must know
/// the directory a file is really in (a symlink `l -> .upload/<session>` names a
/// staged file from outside the staging area).
///
/// A path whose last component is no symlink is that entry of its directory. One
/// that ends in a symlink is resolved whole by the kernel, beneath `root`, in one
/// resolution (every link on the way counted against its `MAXSYMLINKS` of 40, an
/// absolute target refused as `EXDEV`); where that led is then named by its
/// link-free path beneath `root` ([`path_beneath`]), its directory opened by that
/// path with no symlink followed, and the entry there must be the very inode
/// resolved. Before, each link at the end was followed here, one at a time,
/// resolving the path's directories again from `root` for each: a user's 40 links,
/// at the end of a directory path made of 38 nested links of 4 KB `a/../a/…`
/// targets, cost 41 resolutions of some 78,000 components each, 0.1 s of CPU for
/// one path and minutes for an archive token naming thousands.
pub fn locate(root: BorrowedFd<'_>, parts: &[OsString]) -> io::Result<Located> {
    let dir_flags = OFlags::PATH | OFlags::DIRECTORY;
    let Some((name, dirs)) = parts.split_last() else {
        return Ok(Located {
            path: open(root, &[], dir_flags, BENEATH)?,
            parent: None,
        });
    };
    let dir = open(root, dirs, dir_flags, BENEATH)?;
    let st = rustix::fs::statat(&dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
        return entry(dir, name);
    }
    let found = open(root, parts, OFlags::PATH, BENEATH)?;
    let real = match path_beneath(root, found.as_fd()) {
        Ok(real) => real,
        // No `/proc` to name it by (a mount namespace without one): the links at
        // the end are followed here, as they were before.
        Err(e) if !Path::new("/proc/self/fd").exists() => {
            tracing::debug!(error = %e, "no /proc: a path's last links followed one at a time");
            return locate_link_by_link(root, parts);
        }
        Err(e) => return Err(e),
    };
    let Some((name, dirs)) = real.split_last() else {
        return Ok(Located {
            path: found,
            parent: None,
        });
    };
    // A link there now is a directory swapped since it was resolved (a race of
    // the user's, not an escape): as anything moved meanwhile.
    let dir = open(root, dirs, dir_flags, STRICT).map_err(|e| {
        if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
            moved()
        } else {
            e
        }
    })?;
    let st = rustix::fs::statat(&dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)?;
    if (st.st_dev as u64, st.st_ino as u64) != identity(found.as_fd())? {
        return Err(moved());
    }
    Ok(Located {
        path: found,
        parent: Some(Parent {
            dir,
            name: name.clone(),
        }),
    })
}

/// [`locate`] without `/proc`: a symlink in the last place is followed here, one at
/// a time (at most 40, the kernel's `MAXSYMLINKS`), each time resolving the path's
/// directories again beneath `root`, until an entry that is no link is found in a
/// directory descriptor. Costlier than [`locate`] through a user's nested links
/// (a resolution per link), and so only where `/proc` cannot name what the kernel
/// resolved.
fn locate_link_by_link(root: BorrowedFd<'_>, parts: &[OsString]) -> io::Result<Located> {
    const MAX_LINKS: usize = 40;
    let dir_flags = OFlags::PATH | OFlags::DIRECTORY;
    let mut path: Vec<OsString> = parts.to_vec();
    for _ in 0..=MAX_LINKS {
        let Some((name, dirs)) = path.split_last() else {
            return Ok(Located {
                path: open(root, &[], dir_flags, BENEATH)?,
                parent: None,
            });
        };
        if name == ".." {
            return Ok(Located {
                path: open(root, &path, dir_flags, BENEATH)?,
                parent: None,
            });
        }
        let dir = open(root, dirs, dir_flags, BENEATH)?;
        let st = rustix::fs::statat(&dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
            let target = rustix::fs::readlinkat(&dir, name.as_os_str(), Vec::new())?;
            let target = PathBuf::from(OsStr::from_bytes(target.as_bytes()));
            let mut next = dirs.to_vec();
            for c in target.components() {
                match c {
                    Component::Normal(part) => next.push(part.to_owned()),
                    Component::ParentDir => next.push(OsString::from("..")),
                    Component::CurDir => {}
                    Component::RootDir | Component::Prefix(_) => {
                        return Err(rustix::io::Errno::XDEV.into())
                    }
                }
            }
            path = next;
            continue;
        }
        return entry(dir, name);
    }
    Err(rustix::io::Errno::LOOP.into())
}

/// The entry `name` of `dir`, found no symlink a moment ago, as [`Located`]. One
/// swapped for a symlink since is opened as the link itself, which
/// [`open_located`] refuses as it refuses anything but a file or directory.
fn entry(dir: OwnedFd, name: &OsStr) -> io::Result<Located> {
    let fd = openat2(
        &dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        STRICT,
    )?;
    Ok(Located {
        path: fd,
        parent: Some(Parent {
            dir,
            name: name.to_owned(),
        }),
    })
}

/// The error of something moved or removed while it was being resolved.
fn moved() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        "moved or removed while it was resolved",
    )
}

/// The link-free path of `fd` beneath `root`, as its components: the kernel's own
/// name of each (`/proc/self/fd`), the one's a prefix of the other's. Something no
/// longer beneath `root` (moved out, removed: the kernel then adds ` (deleted)`,
/// and no entry has the inode) or named past `PATH_MAX` is an error; a caller
/// finds the entry again by this path and checks it is the same inode.
pub fn path_beneath(root: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    fn name_of(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
        let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        Ok(rustix::fs::readlink(link.as_str(), Vec::new())?.into_bytes())
    }
    let top = name_of(root)?;
    let here = name_of(fd)?;
    let rest = if top == b"/" {
        here.strip_prefix(b"/")
    } else {
        here.strip_prefix(top.as_slice()).and_then(|r| {
            if r.is_empty() {
                Some(r)
            } else {
                r.strip_prefix(b"/")
            }
        })
    };
    let rest = rest.ok_or_else(moved)?;
    Ok(rest
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .map(|c| OsStr::from_bytes(c).to_owned())
        .collect())
}

/// Opens for reading what [`locate`] found: a regular file or a directory, the very
/// inode located, anything else refused without being opened (see [`readable`]).
pub fn open_located(root: BorrowedFd<'_>, located: Located) -> io::Result<OwnedFd> {
    let Located { path, parent } = located;
    readable(path, true, || match &parent {
        Some(p) => Ok(openat2(
            &p.dir,
            p.name.as_os_str(),
            READ | OFlags::NOFOLLOW,
            Mode::empty(),
            STRICT,
        )?),
        None => open(root, &[], READ | OFlags::DIRECTORY, BENEATH),
    })
}

/// A directory descriptor and a name in it: where a mutation happens.
pub struct Parent {
    /// The parent directory.
    pub dir: OwnedFd,
    /// The last component.
    pub name: OsString,
}

/// A path naming the vfolder itself where an entry in it is meant (a rename, a
/// move, a delete of `.`): the caller's mistake, a 400 `invalid-api-params`. Before,
/// it was told `filesystem-error` with no `errno` (an outside tester's find).
#[derive(Debug)]
pub struct VfolderItself;

impl std::fmt::Display for VfolderItself {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the path names the vfolder itself, not an entry in it")
    }
}

impl std::error::Error for VfolderItself {}

/// Opens the parent of `parts` beneath `root`; the last component itself is not
/// resolved, so operations on it act on a symlink, never through it.
pub fn parent(root: BorrowedFd<'_>, parts: &[OsString]) -> io::Result<Parent> {
    let Some((name, dirs)) = parts.split_last() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, VfolderItself));
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
    mkdirs_checked(root, parts, resolve, |_, _| Ok::<(), io::Error>(()))
}

/// [`mkdirs`], asking `check` about every level on the descriptor itself before
/// anything is opened or created in it: `check(dir, Some(name))` before the
/// component `name` is looked up (and created if missing) in `dir`, and
/// `check(last, None)` of the directory returned. A level is never created in a
/// directory `check` refused, whatever a path named when it was resolved (a
/// component swapped for a symlink meanwhile cannot lead the creation elsewhere).
pub fn mkdirs_checked<E: From<io::Error>>(
    root: BorrowedFd<'_>,
    parts: &[OsString],
    resolve: ResolveFlags,
    mut check: impl FnMut(BorrowedFd<'_>, Option<&OsStr>) -> Result<(), E>,
) -> Result<OwnedFd, E> {
    let mut cur = open(root, &[], DIR, resolve)?;
    for i in 0..parts.len() {
        check(cur.as_fd(), Some(parts[i].as_os_str()))?;
        // A plain directory is one step from the last level; only a symlink is
        // resolved from the root again (as `resolve` says). Resolving every level's
        // whole prefix from the root made a deep destination quadratic, and through
        // a few symlinks to deep trees a minute of CPU for one request.
        let step = match child_dir(cur.as_fd(), &parts[i]) {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
                open(root, &parts[..=i], DIR, resolve)
            }
            step => step,
        };
        cur = match step {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match rustix::fs::mkdirat(&cur, parts[i].as_os_str(), Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(io::Error::from(e).into()),
                }
                child_dir(cur.as_fd(), &parts[i])?
            }
            Err(e) => return Err(e.into()),
        };
    }
    check(cur.as_fd(), None)?;
    Ok(cur)
}

/// Renames `from` in `from_dir` to `to` in `to_dir` with one `renameat`, answering
/// whether it replaced an entry: tried first without replacing
/// (`RENAME_NOREPLACE`), and over the destination only when that says it exists.
/// A filesystem without `RENAME_NOREPLACE` has the plain rename, reported as a
/// replacement (the safe side for whoever recounts after one).
pub fn rename_over(
    from_dir: BorrowedFd<'_>,
    from: &OsStr,
    to_dir: BorrowedFd<'_>,
    to: &OsStr,
) -> io::Result<bool> {
    use rustix::io::Errno;
    match rustix::fs::renameat_with(
        from_dir,
        from,
        to_dir,
        to,
        rustix::fs::RenameFlags::NOREPLACE,
    ) {
        Ok(()) => Ok(false),
        Err(Errno::EXIST | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
            rustix::fs::renameat(from_dir, from, to_dir, to)?;
            Ok(true)
        }
        Err(e) => Err(e.into()),
    }
}

/// A directory's device and inode.
pub fn dir_identity(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    identity(fd)
}

/// The most levels [`beneath`] climbs: more than a path resolved beneath a vfolder
/// can have (`PATH_MAX` allows about 2 048 components; symlinks inside may add a few).
const MAX_CLIMB: usize = 8_192;

/// The most levels the climbs of one request take in all ([`Climbs`]): each is an
/// `openat` of `..` and an `fstat`, some 3 µs, so about 0.8 CPU-seconds. A request
/// of paths inside a user's tree climbs each directory once (the climbs remember
/// what they found), far below this; what it bounds is a user's chains of
/// directories deeper than a path can name, reached through short links: each
/// climb from their bottom is 8,000 levels, and once a request's memory of
/// directories is full (13 such chains fill it), a request naming 1,000 paths at
/// their bottom climbed 8 million levels, 28 CPU-seconds for one delete that then
/// failed and could be sent again.
pub const CLIMB_BUDGET: usize = 1 << 18;

/// What the climbs of one request may still take ([`CLIMB_BUDGET`]); past it, a
/// climb fails with [`TooDeep`] and the request is refused (400, naming it).
#[derive(Debug)]
pub struct Climbs(usize);

impl Default for Climbs {
    fn default() -> Self {
        Self(CLIMB_BUDGET)
    }
}

impl Climbs {
    /// A budget of `levels` (tests: the real one is large to reach).
    #[cfg(test)]
    pub(crate) fn with(levels: usize) -> Self {
        Self(levels)
    }

    /// Takes one level, or fails once the budget is spent.
    fn step(&mut self) -> io::Result<()> {
        self.0 = self
            .0
            .checked_sub(1)
            .ok_or_else(|| io::Error::other(TooDeep))?;
        Ok(())
    }
}

/// The error of a request whose climbs spent their [`CLIMB_BUDGET`].
#[derive(Debug)]
pub struct TooDeep;

impl std::fmt::Display for TooDeep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the paths of this request lie too deep to be checked: more than {CLIMB_BUDGET} directory levels climbed in all"
        )
    }
}

impl std::error::Error for TooDeep {}

/// The error of type `T` that `e` carries ([`TooDeep`], [`WalkTooDeep`],
/// [`StillFilled`], [`Unsettled`]: the walks' own refusals, which their callers
/// answer apart from other I/O errors), if it carries one.
pub fn carried<T: std::error::Error + 'static>(e: &io::Error) -> Option<&T> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<T>())
}

/// Where a directory lies, found by climbing its ancestors by `..` (the kernel's
/// own parent links, never a path or a symlink): `Ok(true)` when one of them (or
/// itself) is `inside`, `Ok(false)` when the climb reaches `top` or a directory in
/// `outside` first. An error when it reaches neither (a directory moved out from
/// under `top` meanwhile, or deeper than [`MAX_CLIMB`]).
pub fn beneath(
    dir: BorrowedFd<'_>,
    inside: (u64, u64),
    top: (u64, u64),
    outside: Option<(u64, u64)>,
) -> io::Result<bool> {
    let mut held: Option<OwnedFd> = None;
    for _ in 0..MAX_CLIMB {
        let at = held.as_ref().map_or(dir, |fd| fd.as_fd());
        let id = identity(at)?;
        if id == inside {
            return Ok(true);
        }
        if id == top || Some(id) == outside {
            return Ok(false);
        }
        let up = rustix::fs::openat(at, "..", DIR | OFlags::NOFOLLOW, Mode::empty())?;
        if identity(up.as_fd())? == id {
            break;
        }
        held = Some(up);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        "not beneath the directory it was resolved in",
    ))
}

/// The most directories [`beneath_known`] remembers as found outside: 16 bytes
/// each, whatever a user makes.
const MAX_KNOWN: usize = 100_000;

/// [`beneath`], remembering in `known` every directory a climb found outside
/// `inside` (up to [`MAX_KNOWN`] of them), and stopping at one of them: the read
/// routes check each of up to 10 000 paths of an archive token, most of them in the
/// same few directories, and each climb then costs the levels not seen before.
pub fn beneath_known(
    dir: BorrowedFd<'_>,
    inside: (u64, u64),
    top: (u64, u64),
    known: &mut std::collections::HashSet<(u64, u64)>,
    climbs: &mut Climbs,
) -> io::Result<bool> {
    let mut held: Option<OwnedFd> = None;
    let mut seen = Vec::new();
    for _ in 0..MAX_CLIMB {
        let at = held.as_ref().map_or(dir, |fd| fd.as_fd());
        let id = identity(at)?;
        if id == inside {
            return Ok(true);
        }
        if id == top || known.contains(&id) {
            let room = MAX_KNOWN.saturating_sub(known.len());
            known.extend(seen.into_iter().take(room));
            return Ok(false);
        }
        seen.push(id);
        climbs.step()?;
        // `O_PATH`: a climb needs no right to list the directories it passes.
        let up = rustix::fs::openat(
            at,
            "..",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        if identity(up.as_fd())? == id {
            break;
        }
        held = Some(up);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        "not beneath the directory it was resolved in",
    ))
}

/// Which of `paths` an archive of them all needs, by index in their order: the first
/// of a path listed more than once, and none inside another listed path (the other's
/// walk has its entries already). A list naming one directory 10 000 times, or a
/// directory and paths under it, would otherwise archive its tree as many times.
///
/// Sorted by components, a path's copies and the paths inside it follow it at once,
/// so one pass keeps a path unless it starts with the last one kept: O(n log n)
/// comparisons, each no longer than the shorter path (checking every prefix of
/// every path was quadratic in a path's depth, and one path of a token can have
/// 30 000 components).
pub fn outermost(paths: &[Vec<OsString>]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..paths.len()).collect();
    // Stable: of equal paths, the first listed comes first and is the one kept.
    order.sort_by(|&a, &b| paths[a].cmp(&paths[b]));
    let mut kept: Vec<usize> = Vec::new();
    for i in order {
        if kept
            .last()
            .is_some_and(|&k| paths[i].starts_with(&paths[k]))
        {
            continue;
        }
        kept.push(i);
    }
    kept.sort_unstable();
    kept
}

/// Whether the directory `dir` lies strictly inside one of `dirs` (by device and
/// inode), found by climbing its ancestors by `..` up to `top` (which counts as one
/// of them when listed in `dirs`): what a path through a symlink (`self/d` with
/// `self -> .`) reaches, which no comparison of paths sees.
pub fn inside_any(
    dir: BorrowedFd<'_>,
    dirs: &std::collections::HashSet<(u64, u64)>,
    top: (u64, u64),
    climbs: &mut Climbs,
) -> io::Result<bool> {
    let mut held: Option<OwnedFd> = None;
    let mut id = identity(dir)?;
    for _ in 0..MAX_CLIMB {
        if id == top {
            return Ok(false);
        }
        climbs.step()?;
        let at = held.as_ref().map_or(dir, |fd| fd.as_fd());
        let up = rustix::fs::openat(at, "..", DIR | OFlags::NOFOLLOW, Mode::empty())?;
        let up_id = identity(up.as_fd())?;
        if dirs.contains(&up_id) {
            return Ok(true);
        }
        if up_id == id {
            return Ok(false);
        }
        id = up_id;
        held = Some(up);
    }
    Ok(false)
}

/// One entry of a directory, not followed.
pub struct Entry {
    /// Its name.
    pub name: OsString,
    /// What the walks use of its status (`AT_SYMLINK_NOFOLLOW`).
    pub stat: Meta,
}

/// The part of an entry's status the walks read, under `stat`'s own field names.
/// A listing ([`first_entries`]) or an archive sorting a directory's files holds
/// entries, and a user with a shell can fill a directory with a million empty
/// files in seconds: `Stat` itself is 144 bytes, most of them never read, so they
/// keep this (56 bytes) instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// The device it is on.
    pub st_dev: u64,
    /// Its inode.
    pub st_ino: u64,
    /// Its type and permission bits.
    pub st_mode: u32,
    /// Its hard links.
    pub st_nlink: u64,
    /// Its size in bytes.
    pub st_size: i64,
    /// Its modification time: seconds since the epoch.
    pub st_mtime: i64,
    /// Its modification time: nanoseconds within the second.
    pub st_mtime_nsec: i64,
}

impl From<&rustix::fs::Stat> for Meta {
    #[allow(clippy::unnecessary_cast)] // The field types differ between targets.
    fn from(st: &rustix::fs::Stat) -> Self {
        Self {
            st_dev: st.st_dev as u64,
            st_ino: st.st_ino as u64,
            st_mode: st.st_mode as u32,
            st_nlink: st.st_nlink as u64,
            st_size: st.st_size as i64,
            st_mtime: st.st_mtime as i64,
            st_mtime_nsec: st.st_mtime_nsec as i64,
        }
    }
}

impl Entry {
    /// The entry `name` of `dir` as it is now (`AT_SYMLINK_NOFOLLOW`), or `None` when
    /// it is gone (removed since it was read, or since its name was kept).
    fn at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<Self>> {
        match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(Self {
                name: name.to_owned(),
                stat: Meta::from(&stat),
            })),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The entry's type.
    pub fn kind(&self) -> FileType {
        FileType::from_raw_mode(self.stat.st_mode)
    }
}

/// The entries of a directory (without `.` and `..`), sorted by name; an entry that
/// vanishes while listed is left out. All of them: [`first_entries`] with no limit.
pub fn entries(dir: BorrowedFd<'_>) -> io::Result<Vec<Entry>> {
    first_entries(dir, usize::MAX, |_| false).map(|(all, _)| all)
}

/// At most `limit` entries of a directory (without `.`, `..` and those `skip`
/// names), sorted by name, and whether it holds more. The directory is read no
/// further than the first entry past `limit`: a user with a shell fills one with
/// millions of empty files in seconds, and [`entries`] takes a `stat` of every one
/// of them and holds it (about 110 bytes with a short name, 350 at most). Which
/// entries make the cut is the order the directory is read in (the file system's,
/// as the original's `scandir-limit` does), not the first by name: finding those
/// would read the whole directory again. An entry that vanishes while listed is
/// left out and does not count.
pub fn first_entries(
    dir: BorrowedFd<'_>,
    limit: usize,
    skip: impl Fn(&OsStr) -> bool,
) -> io::Result<(Vec<Entry>, bool)> {
    let mut out = Vec::new();
    for e in Dir::read_from(dir)? {
        let e = e?;
        let name = OsStr::from_bytes(e.file_name().to_bytes());
        if name == "." || name == ".." || skip(name) {
            continue;
        }
        match Entry::at(dir, name)? {
            Some(_) if out.len() == limit => {
                out.sort_by(|a: &Entry, b| a.name.cmp(&b.name));
                return Ok((out, true));
            }
            Some(entry) => out.push(entry),
            None => {}
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((out, false))
}

/// A directory's identity: `(st_dev, st_ino)`.
fn identity(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev as u64, st.st_ino as u64))
}

/// How many levels below its top a walk keeps descriptors of; deeper ancestors are
/// reached again by `..` and checked by identity (as `fts` does), so a walk holds
/// at most this many descriptors however deep or wide the tree is.
pub(crate) const HELD: usize = 32;

/// The directories from a walk's top down to where it is now.
struct Trail<'a> {
    top: BorrowedFd<'a>,
    /// Below the top: each level's identity and, for the first `HELD` levels and
    /// the current one, its descriptor.
    levels: Vec<(Option<OwnedFd>, (u64, u64))>,
}

impl<'a> Trail<'a> {
    fn new(top: BorrowedFd<'a>) -> Self {
        Self {
            top,
            levels: Vec::new(),
        }
    }

    /// The directory the walk is in.
    fn current(&self) -> BorrowedFd<'_> {
        match self.levels.last() {
            Some((Some(fd), _)) => fd.as_fd(),
            _ => self.top,
        }
    }

    /// Steps down into `dir`.
    fn push(&mut self, dir: OwnedFd) -> io::Result<()> {
        let id = identity(dir.as_fd())?;
        if self.levels.len() > HELD {
            if let Some(last) = self.levels.last_mut() {
                last.0 = None;
            }
        }
        self.levels.push((Some(dir), id));
        Ok(())
    }

    /// Steps back up to the parent. A parent whose descriptor was let go is opened
    /// as `..` of the current directory and must be the very directory the walk came
    /// down through: a tree moved meanwhile stops the walk instead of leading it
    /// anywhere else.
    fn pop(&mut self) -> io::Result<()> {
        let Some((Some(child), _)) = self.levels.pop() else {
            return Ok(());
        };
        if let Some(parent) = self.levels.last_mut() {
            if parent.0.is_none() {
                parent.0 = Some(climb(child.as_fd(), parent.1, "walked")?);
            }
        }
        Ok(())
    }
}

impl Trail<'_> {
    /// Checks that the directories the walk is in are still where the walk came
    /// down through: the `..` of each whose descriptor it holds (the current one,
    /// and the `HELD` first below the top) is the directory above it (the top for
    /// the first level). One moved meanwhile (out of the top, say) stops the walk
    /// instead of leading it on from wherever it is now. A level deeper than those,
    /// whose descriptor was let go, is checked when the walk climbs through it
    /// ([`climb`]).
    fn still_beneath(&self) -> io::Result<()> {
        let top = identity(self.top)?;
        for (i, (fd, _)) in self.levels.iter().enumerate().rev() {
            let Some(fd) = fd else {
                continue;
            };
            let above = match i.checked_sub(1).and_then(|i| self.levels.get(i)) {
                Some((_, id)) => *id,
                None => top,
            };
            let up = match rustix::fs::statat(fd, "..", AtFlags::SYMLINK_NOFOLLOW) {
                Ok(up) => Meta::from(&up),
                // Removed meanwhile: it holds nothing and can be given nothing
                // more, so leads nowhere (those above it are checked apart).
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Err(e.into()),
            };
            if (up.st_dev, up.st_ino) != above {
                return Err(io::Error::other("a directory moved while it was walked"));
            }
        }
        Ok(())
    }
}

/// The parent of `child`, opened as its `..`, which must be the directory `id` (a
/// walk's or a delete's level whose descriptor was let go): a tree moved meanwhile
/// stops the walk (`what` it was: "walked", "deleted") instead of leading it
/// anywhere else.
fn climb(child: BorrowedFd<'_>, id: (u64, u64), what: &str) -> io::Result<OwnedFd> {
    let up = rustix::fs::openat(child, "..", DIR | OFlags::NOFOLLOW, Mode::empty())?;
    if identity(up.as_fd())? != id {
        return Err(io::Error::other(format!(
            "a directory moved while it was {what}"
        )));
    }
    Ok(up)
}

/// What a walk does at each step (see [`walk`]).
pub trait Visitor {
    /// An entry of the directory being walked (`dir`, `depth` levels below the top);
    /// answers whether to descend into it (directories only).
    fn entry(&mut self, dir: BorrowedFd<'_>, e: &Entry, depth: usize) -> io::Result<bool>;
    /// The walk could not open or list the directory `e` of `dir`: by default
    /// skipped only when it is gone or no longer a directory (see [`is_gone`]); any
    /// other failure (unreadable, descriptors exhausted) stops the walk, which would
    /// otherwise pass for whole without it.
    fn unopened(&mut self, _dir: BorrowedFd<'_>, e: &Entry, err: io::Error) -> io::Result<()> {
        if is_gone(&err) {
            return Ok(());
        }
        Err(unopenable("directory", &e.name.to_string_lossy(), &err))
    }
    /// Whether the walk reads each directory once more first, handing each of its
    /// entries to [`Visitor::reserve`] before any is visited. Either way the
    /// entries that are not directories are visited as the directory is read,
    /// then its subdirectories one by one as a second read meets them (see
    /// [`walk`]): a walk holds no names, neither of files, of which a user with a
    /// shell can make millions in seconds at no cost in quota, nor of
    /// subdirectories (a block each).
    fn reserves(&self) -> bool {
        false
    }
    /// Up to how many of a directory's entries that are not directories the walk
    /// holds to visit them sorted by name (0, the default: none, each is visited as
    /// it is read). A directory with more has them visited in the order it is read,
    /// the held ones first: the walk never holds more than this many.
    fn sorted_up_to(&self) -> usize {
        0
    }
    /// An entry of the directory about to be walked (the top first, then each
    /// directory entered, after `enter`), before any of its entries is visited;
    /// only when [`Visitor::reserves`].
    fn reserve(&mut self, _e: &Entry) -> io::Result<()> {
        Ok(())
    }
    /// The walk entered `dir` (named `name`; `empty` when it has no entries, known
    /// only when [`Visitor::reserves`]: false otherwise).
    fn enter(&mut self, _dir: BorrowedFd<'_>, _name: &OsStr, _empty: bool) -> io::Result<()> {
        Ok(())
    }
    /// The walk is done with `name`, an entry of `parent`.
    fn leave(&mut self, _parent: BorrowedFd<'_>, _name: &OsStr) -> io::Result<()> {
        Ok(())
    }
}

/// Walks the tree under `top` depth first, without recursion and never following a
/// symlink: every directory is opened with `O_NOFOLLOW` beneath its parent.
///
/// Nothing is held of a directory's entries (but the few a visitor asks to have
/// sorted, [`Visitor::sorted_up_to`]): each directory is read twice, in batches
/// (`getdents`; the second's of at most [`WALK_BATCH`] bytes, shared by every
/// level). The first read visits the entries that are not directories; the second
/// goes down into each subdirectory as it meets it, remembering for each level only its read position (`getdents`
/// offset), the inode of the subdirectory gone down into and that one's name (at
/// most 255 bytes), as [`remove_tree`] does. Back from a subdirectory, the read
/// goes on from its position: the entry there is skipped if it is that
/// subdirectory (by inode), and read as the next one otherwise (the walk removes
/// nothing, so positions stay valid, ordinals as on a ramfs or tmpfs before Linux
/// 6.6 included; only someone else's removals and additions can move them, and a
/// measurement is then approximate, as any of a tree being written is). Memory is
/// one batch and some 300 bytes per level, whatever the width; descriptors at most
/// `HELD + 2`, whatever the depth: a user can make a tree deeper than any stack,
/// wider than any buffer and than the descriptor limit.
///
/// Before going down and when back, the `..` of each directory it is in (whose
/// descriptor it holds) must still be the one it came down from
/// ([`Trail::still_beneath`]): a directory moved meanwhile (out of the top, say)
/// stops the walk instead of leading it on outside. A directory someone keeps
/// filling while it is walked is read at most [`WALK_READS`] times its first read's
/// entries (and 1,024 more) in its second read; past that the walk stops with an
/// error: it never goes on for ever.
///
/// A walk goes down at most [`WALK_LEVELS`] levels below its top: what it holds
/// grows with the depth it is at (some 350 bytes a level, its own and its
/// visitor's), and a user makes a chain of 100,000 directories from a shell in
/// seconds at no cost in quota. A deeper directory stops the walk with
/// [`WalkTooDeep`] (a measurement fails closed, an archive is cut off, a clone is
/// refused), never a walk that forgets levels and goes down again (it would count
/// what it saw twice).
pub fn walk(top: BorrowedFd<'_>, v: &mut dyn Visitor) -> io::Result<()> {
    walk_with(top, v, WALK_BATCH, WALK_LEVELS)
}

/// The most levels below its top a walk goes down ([`walk`]), as many as a delete
/// remembers: some 1.4 MiB a walk at most (a level's place, 64 bytes and a name of
/// up to 255, its descriptor and identity, the visitor's few bytes). A path can
/// name about 2,048 levels (`PATH_MAX`), so no tree made through the API is
/// deeper.
pub const WALK_LEVELS: usize = 1 << 12;

/// The error of a walk that met a directory deeper than it goes ([`WALK_LEVELS`]).
#[derive(Debug)]
pub struct WalkTooDeep {
    /// The levels it goes down at most.
    pub levels: usize,
}

impl std::fmt::Display for WalkTooDeep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the tree is deeper than the {} directory levels a walk goes down: it cannot be measured, archived or cloned until what lies deeper is deleted",
            self.levels
        )
    }
}

impl std::error::Error for WalkTooDeep {}

/// Bytes of directory entries a walk reads at a time ([`walk`]), as a delete does.
pub const WALK_BATCH: usize = DELETE_BATCH;

/// The first read of a directory the walk comes back to: small, for its next
/// subdirectory is most often its next entry; doubled while none is met.
const WALK_BATCH_FIRST: usize = 1 << 10;

/// How many times its first read's entries the second read of a directory may
/// read (plus 1,024): more only while someone keeps adding entries to it.
pub const WALK_READS: u64 = 2;

/// How many more directories a walk may go into than its reads listed (made
/// after their parent was read, or met again under a new name) before it stops.
pub const WALK_AGAIN: u64 = 256;

/// Where a walk is in the subdirectories of one directory (its second read).
struct Place {
    /// The directory's name in its parent (empty for the top).
    name: OsString,
    /// The `getdents` position the next read starts at.
    at: u64,
    /// The inode of the subdirectory gone down into, whose entry is at `at`.
    below: Option<u64>,
    /// Entries read so far, and the most that may be read.
    read: u64,
    most: u64,
}

impl Place {
    fn new(name: OsString, first_read: u64) -> Self {
        Self {
            name,
            at: 0,
            below: None,
            read: 0,
            most: first_read.saturating_mul(WALK_READS).saturating_add(1024),
        }
    }
}

/// [`walk`] reading `batch` bytes at a time and going down at most `levels` levels
/// (tests: small ones).
fn walk_with(
    top: BorrowedFd<'_>,
    v: &mut dyn Visitor,
    batch: usize,
    levels: usize,
) -> io::Result<()> {
    let reserves = v.reserves();
    let keep = v.sorted_up_to();
    let batch = batch.max(DELETE_BATCH_LEAST);
    let mut buf: Vec<u8> = Vec::with_capacity(batch);
    let mut trail = Trail::new(top);
    if reserves {
        read_ahead(top, v)?;
    }
    let (first, mut listed) = visit_files(Dir::read_from(top)?, top, v, 0, keep)?;
    let mut places = vec![Place::new(OsString::new(), first)];
    // Directories gone into, against those the first reads listed: in a tree
    // that holds still they are equal. Each directory made after its parent's
    // first read, or met again under a new name (renamed, within its parent, while
    // the walk was in it: its entry comes again later), adds one; past
    // `WALK_AGAIN` the walk stops. Else a user renaming directories as they are
    // walked had each walked again, and again below, per level: work exponential
    // in the depth. So bounded, a walk does at most `WALK_AGAIN + 1` times the
    // tree's work.
    let mut entered = 0u64;
    loop {
        let depth = places.len().saturating_sub(1);
        let dir = trail.current();
        let Some(place) = places.last_mut() else {
            break;
        };
        let Some((name, ino, next, listed_dir)) = next_subdir(dir, place, &mut buf, batch)? else {
            let Some(done) = places.pop() else {
                break;
            };
            if places.is_empty() {
                break;
            }
            trail.pop()?;
            trail.still_beneath()?;
            v.leave(trail.current(), &done.name)?;
            continue;
        };
        // Looked at now: the walk sees the entry as it is when its turn comes
        // (gone, or no longer a directory, it is what it has become). Not gone
        // into, the read goes on past it.
        let Some(e) = Entry::at(dir, &name)? else {
            place.at = next;
            continue;
        };
        if e.kind() != FileType::Directory {
            // Not a directory now. Listed as one, the first read left it to this
            // one: it is visited as what it has become. Listed with its type
            // unknown (NFS without `READDIRPLUS`, XFS without `ftype`, some FUSE),
            // the first read looked at it and visited it already: not twice.
            if listed_dir {
                v.entry(dir, &e, depth)?;
            }
            place.at = next;
            continue;
        }
        if !v.entry(dir, &e, depth)? {
            place.at = next;
            continue;
        }
        if depth >= levels {
            return Err(io::Error::other(WalkTooDeep { levels }));
        }
        entered += 1;
        if entered > listed.saturating_add(WALK_AGAIN) {
            return Err(io::Error::other(format!(
                "directories are being made or renamed under {:?} as fast as it is walked ({entered} gone into, {listed} listed): the walk stopped; try again once nothing changes there",
                place.name
            )));
        }
        trail.still_beneath()?;
        let opened = child_dir(dir, &e.name).and_then(|sub| {
            let empty = reserves && is_empty(sub.as_fd())?;
            Ok((Dir::read_from(&sub)?, sub, empty))
        });
        let (reader, sub, empty) = match opened {
            Ok(opened) => opened,
            Err(err) => {
                place.at = next;
                v.unopened(dir, &e, err)?;
                continue;
            }
        };
        // Back here, the read goes on from the subdirectory's own entry, skipped
        // if it is still this subdirectory.
        place.below = Some(ino);
        v.enter(sub.as_fd(), &e.name, empty)?;
        if reserves {
            read_ahead(sub.as_fd(), v)?;
        }
        trail.push(sub)?;
        let (first, dirs) = visit_files(reader, trail.current(), v, depth + 1, keep)?;
        listed = listed.saturating_add(dirs);
        places.push(Place::new(e.name, first));
    }
    Ok(())
}

/// The next entry of `dir` that is (or may be: its type unknown) a directory,
/// read from where `place` is: its name, inode, the position past it and whether
/// it was listed as a directory (not of unknown type); `place` is left at its
/// entry. `None` at the end of the directory.
fn next_subdir(
    dir: BorrowedFd<'_>,
    place: &mut Place,
    buf: &mut Vec<u8>,
    batch: usize,
) -> io::Result<Option<(OsString, u64, u64, bool)>> {
    let mut want = WALK_BATCH_FIRST.clamp(DELETE_BATCH_LEAST, batch);
    loop {
        match rustix::fs::seek(dir, rustix::fs::SeekFrom::Start(place.at)) {
            Ok(_) => {}
            // Removed meanwhile (while the walk was below it): nothing is left.
            Err(_) if removed_dir(dir) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let spare = buf.spare_capacity_mut();
        let len = want.min(spare.len());
        let mut entries = rustix::fs::RawDir::new(dir, &mut spare[..len]);
        let mut any = false;
        while let Some(e) = entries.next() {
            let e = match e {
                Ok(e) => e,
                Err(rustix::io::Errno::NOENT) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            any = true;
            let next = e.next_entry_cookie();
            let name = e.file_name().to_bytes();
            if name == b"." || name == b".." {
                place.at = next;
                continue;
            }
            // The subdirectory the walk came back from, where it was left: done.
            // Anything else there (it was moved or removed, or the positions moved
            // under someone else's changes) is read as the next entry.
            if place.below.take() == Some(e.ino()) {
                place.at = next;
                continue;
            }
            place.read += 1;
            if place.read > place.most {
                return Err(io::Error::other(format!(
                    "entries are being added to the directory {:?} as fast as it is walked (more than {} read): the walk stopped; try again once nothing writes there",
                    place.name, place.most
                )));
            }
            let listed = listed_type(e.file_type());
            let listed_dir = listed == FileType::Directory;
            if listed_dir || listed == FileType::Unknown {
                return Ok(Some((
                    OsStr::from_bytes(name).to_owned(),
                    e.ino(),
                    next,
                    listed_dir,
                )));
            }
            place.at = next;
        }
        if !any {
            return Ok(None);
        }
        want = want.saturating_mul(2).min(batch);
    }
}

/// The type a walk's read of a directory gives an entry: as listed (tests may list
/// every entry's as unknown, as NFS without `READDIRPLUS` and XFS without `ftype`
/// do).
fn listed_type(listed: FileType) -> FileType {
    #[cfg(test)]
    if tests::TYPES_HIDDEN.with(std::cell::Cell::get) {
        return FileType::Unknown;
    }
    listed
}

/// Reads `dir` once, handing each entry to [`Visitor::reserve`]. An entry that
/// vanishes while read is left out.
fn read_ahead(dir: BorrowedFd<'_>, v: &mut dyn Visitor) -> io::Result<()> {
    for e in Dir::read_from(dir)? {
        let e = e?;
        let name = OsStr::from_bytes(e.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        if let Some(entry) = Entry::at(dir, name)? {
            v.reserve(&entry)?;
        }
    }
    Ok(())
}

/// Whether `dir` has no entries (besides `.` and `..`), read no further than its
/// first.
pub fn is_empty(dir: BorrowedFd<'_>) -> io::Result<bool> {
    for e in Dir::read_from(dir)? {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name != b"." && name != b".." {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Reads `dir` through `reader`, visiting each entry that is not a directory as it
/// comes, or sorted when there are no more than [`Visitor::sorted_up_to`] (`depth`
/// below the walk's top); directories are left for the second read ([`walk`]).
/// Answers how many entries it read, and how many of them were directories. An
/// entry that vanishes while read is left out.
fn visit_files(
    reader: Dir,
    dir: BorrowedFd<'_>,
    v: &mut dyn Visitor,
    depth: usize,
    keep: usize,
) -> io::Result<(u64, u64)> {
    let mut held = Vec::new();
    let mut streaming = keep == 0;
    let (mut read, mut dirs) = (0u64, 0u64);
    for e in reader {
        let e = match e {
            Ok(e) => e,
            // Removed while it was read: nothing more is in it.
            Err(rustix::io::Errno::NOENT) => break,
            Err(e) => return Err(e.into()),
        };
        let name = OsStr::from_bytes(e.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        read += 1;
        if listed_type(e.file_type()) == FileType::Directory {
            dirs += 1;
            continue;
        }
        let Some(entry) = Entry::at(dir, name)? else {
            continue;
        };
        if entry.kind() == FileType::Directory {
            dirs += 1;
            continue;
        } else if streaming {
            v.entry(dir, &entry, depth)?;
        } else {
            held.push(entry);
            if held.len() > keep {
                for e in std::mem::take(&mut held) {
                    v.entry(dir, &e, depth)?;
                }
                streaming = true;
            }
        }
    }
    held.sort_by(|a, b| a.name.cmp(&b.name));
    for e in &held {
        v.entry(dir, e, depth)?;
    }
    Ok((read, dirs))
}

/// Bytes of directory entries a recursive delete reads at a time ([`remove_tree`]):
/// one `getdents` buffer, shared by every level (some 120 entries with 255-byte
/// names, about a thousand with short ones).
pub const DELETE_BATCH: usize = 32 << 10;

/// The least a delete's batch may be: one entry with the longest name
/// (`linux_dirent64`: 19 bytes, the name and its NUL, 8-aligned).
const DELETE_BATCH_LEAST: usize = 280;

/// How many times in one visit a recursive delete reads one directory again from
/// its start after a pass that reached its end (or goes down again into a
/// subdirectory it emptied, found refilled) before it gives up: a directory needs
/// two reads (one removing what is there, one finding it empty), a third where the
/// file system's order moved under the removals; more only while someone keeps
/// adding entries to it. A read from the start because the delete, back from a
/// subdirectory, did not find that subdirectory where it had left the directory
/// (positions that moved under its removals: see [`remove_tree`]) is no such read.
/// Past it, the delete stops with [`StillFilled`], what it removed gone, the rest
/// left.
pub const DELETE_ROUNDS: u32 = 8;

/// The most levels below its top a recursive delete remembers (64 bytes each,
/// 256 KiB). A deeper chain has its oldest levels forgotten, and once the delete
/// has climbed back to the oldest it remembers, it goes down again from the top
/// (its levels removed so far are gone): some more work for a tree deeper than
/// 4,096 levels (each a directory, a block of its user's quota), never more memory.
const DELETE_LEVELS: usize = 1 << 12;

/// How many times one delete goes down again from its top because a level it
/// left, deeper than the descriptors it holds, was removed by someone else and its
/// `..` led nowhere (see [`remove_tree`]); past it, [`StillFilled`].
const DELETE_VANISHED: usize = 1 << 10;

/// The error of a recursive delete that found a directory refilled as fast as it
/// emptied it ([`DELETE_ROUNDS`] reads from its start in one visit): what it
/// removed is gone, `path` (below the vfolder) and what is in it is left.
#[derive(Debug)]
pub struct StillFilled {
    /// The directory, from the top of the tree being deleted.
    pub path: PathBuf,
}

impl std::fmt::Display for StillFilled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "entries are being added to {:?} as fast as they are removed ({DELETE_ROUNDS} reads of it from its start): the delete stopped, that directory and what is in it left; try again once nothing writes there",
            self.path
        )
    }
}

impl std::error::Error for StillFilled {}

/// Removes `name` in `dir`: a directory with everything under it, anything else
/// (symlinks included) by unlinking the entry itself. Returns the entries removed.
///
/// Nothing is held of a directory's entries but one batch of them
/// ([`DELETE_BATCH`] bytes, read by `getdents`): each entry is removed as it is
/// read (a file or symlink unlinked, an empty directory removed), and a
/// subdirectory that is not empty is descended into there and then, depth first;
/// back in the directory, the read goes on from that entry (its `getdents`
/// position) if that subdirectory is found there, and otherwise from the
/// directory's start (where the positions are ordinals, as on a ramfs, tmpfs
/// before Linux 6.6 or an overlayfs merged directory opened again, the removals
/// ahead of a position moved it onto later entries, which reading on would have
/// skipped; what was removed is gone, so a read from the start shows what is
/// left). Once a read reaches the end, the directory is read again from its
/// start until a read from the start finds nothing (removed entries do not come
/// back). A directory of any width is so removed in the memory of one batch and,
/// for each level it is in, 64 bytes ([`walk`] now works the same way).
///
/// Never a symlink followed: every directory is opened `O_NOFOLLOW` beneath the one
/// it was read in ([`child_dir`]), every removal is an `*at` call on the directory
/// the name was read in, and an entry swapped for another kind meanwhile (a
/// directory for a symlink to anywhere) is removed as what it is now: the link,
/// never its target. Descriptors: the top and the `HELD` deepest levels; a level
/// above them is reached again by `..` and must be the very directory the delete
/// came down through (a tree moved meanwhile stops it, [`Trail`]'s check).
///
/// A directory someone keeps filling while it is deleted is read again from its
/// start after reaching its end (or a subdirectory of it emptied again, found
/// refilled) at most [`DELETE_ROUNDS`] times in one visit; past that, the delete
/// stops with [`StillFilled`] naming it. Whatever a file system's positions mean,
/// a read that reached the end read on only from positions so checked and removed
/// all it met, so with nobody writing the next read from the start finds nothing:
/// no directory is taken for refilled that nobody writes to.
pub fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<u64> {
    remove_tree_with(dir, name, DELETE_BATCH, DELETE_LEVELS)
}

/// [`remove_tree`] with a batch of `batch` bytes and `levels` levels remembered
/// (tests: small ones).
fn remove_tree_with(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    batch: usize,
    levels: usize,
) -> io::Result<u64> {
    let top = match child_dir(dir, name) {
        Ok(top) => top,
        // A symlink (ELOOP) or a non-directory (ENOTDIR): the entry itself goes.
        Err(e) if is_not_dir(&e) => {
            rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
            return Ok(1);
        }
        Err(e) => return Err(e),
    };
    let id = identity(top.as_fd())?;
    let mut buf: Vec<u8> = Vec::with_capacity(batch.max(DELETE_BATCH_LEAST));
    let mut removed = 0;
    let mut refilled = 0;
    loop {
        empty_tree(top.as_fd(), &mut buf, levels.max(1), &mut removed).map_err(|e| {
            if let Some(inner) = carried::<StillFilled>(&e) {
                let path = if inner.path.as_os_str().is_empty() {
                    PathBuf::from(name)
                } else {
                    Path::new(name).join(&inner.path)
                };
                tracing::warn!(path = %path.display(), removed, "recursive delete stopped: a directory refilled as fast as it was emptied");
                return io::Error::other(StillFilled { path });
            }
            e
        })?;
        match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
            Ok(()) => return Ok(removed + 1),
            // Removed by someone else while it was emptied (it was there when the
            // delete began: only a top gone from the start is an error).
            Err(rustix::io::Errno::NOENT) => return Ok(removed),
            // Filled again since it was read empty: emptied again while it is
            // still the directory deleted (a bounded number of times).
            Err(rustix::io::Errno::NOTEMPTY | rustix::io::Errno::EXIST)
                if refilled + 1 < DELETE_ROUNDS
                    && rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).is_ok_and(
                        |s| {
                            let m = Meta::from(&s);
                            (m.st_dev, m.st_ino) == id
                        },
                    ) =>
            {
                refilled += 1;
            }
            Err(rustix::io::Errno::NOTEMPTY | rustix::io::Errno::EXIST) => {
                return Err(io::Error::other(StillFilled {
                    path: PathBuf::from(name),
                }))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Where a delete is in one directory.
#[derive(Default)]
struct Cursor {
    /// The `getdents` position its next read starts at (0: its start).
    at: u64,
    /// Whether the read since it last started from the start met an entry.
    met: bool,
    /// Whether `at` is the position of the subdirectory it went down into, `below`,
    /// to be found there before the read goes on from it.
    resuming: bool,
    /// Times it was read from its start again after a read reached its end, or a
    /// subdirectory was found refilled.
    rounds: u32,
    /// The subdirectory it last went down into.
    below: Option<(u64, u64)>,
}

impl Cursor {
    /// Counts one more round; past [`DELETE_ROUNDS`], the delete stops.
    fn again(&mut self) -> io::Result<()> {
        self.rounds += 1;
        if self.rounds >= DELETE_ROUNDS {
            return Err(io::Error::other(StillFilled {
                path: PathBuf::new(),
            }));
        }
        Ok(())
    }
}

/// A level below the top of a delete.
struct Level {
    /// Its descriptor, for the `HELD` deepest levels.
    fd: Option<OwnedFd>,
    /// Its device and inode.
    id: (u64, u64),
    cursor: Cursor,
}

/// What reading a directory came to.
enum Read {
    /// It read empty from its start.
    Empty,
    /// It has a subdirectory that is not empty, opened.
    Down(OwnedFd),
}

/// Empties the directory `top` (see [`remove_tree`]), adding the entries removed to
/// `removed`; done when a read of `top` from its start finds nothing.
fn empty_tree(
    top: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    max_levels: usize,
    removed: &mut u64,
) -> io::Result<()> {
    let mut top_cursor = Cursor::default();
    let mut levels: std::collections::VecDeque<Level> = std::collections::VecDeque::new();
    // Whether levels above the oldest in `levels` were forgotten.
    let mut forgot = false;
    // Times a level's `..` led nowhere, the level removed by someone else.
    let mut vanished = 0usize;
    loop {
        let read = match levels.back_mut() {
            Some(level) => {
                let fd = level.fd.as_ref().map(|fd| fd.as_fd());
                let fd =
                    fd.ok_or_else(|| io::Error::other("a delete's level without its descriptor"))?;
                read_level(fd, &mut level.cursor, buf, removed)
            }
            None => read_level(top, &mut top_cursor, buf, removed),
        };
        let read = read.map_err(|e| {
            // Named where it happened, from the top.
            if carried::<StillFilled>(&e).is_some() {
                let here: PathBuf = levels
                    .back()
                    .and_then(|l| l.fd.as_ref())
                    .and_then(|fd| path_beneath(top, fd.as_fd()).ok())
                    .unwrap_or_default()
                    .iter()
                    .collect();
                let below = carried::<StillFilled>(&e)
                    .map(|f| f.path.clone())
                    .unwrap_or_default();
                return io::Error::other(StillFilled {
                    path: here.join(below),
                });
            }
            e
        })?;
        match read {
            Read::Down(sub) => {
                let id = identity(sub.as_fd())?;
                if levels.len() >= max_levels {
                    levels.pop_front();
                    forgot = true;
                }
                if levels.len() >= HELD {
                    let at = levels.len() - HELD;
                    levels[at].fd = None;
                }
                levels.push_back(Level {
                    fd: Some(sub),
                    id,
                    cursor: Cursor::default(),
                });
            }
            Read::Empty => {
                let Some(child) = levels.pop_back() else {
                    // The top read empty from its start: done.
                    return Ok(());
                };
                match levels.back_mut() {
                    Some(parent) if parent.fd.is_none() => {
                        let Some(fd) = child.fd.as_ref() else {
                            return Err(io::Error::other(
                                "a delete's level without its descriptor",
                            ));
                        };
                        match climb(fd.as_fd(), parent.id, "deleted") {
                            Ok(up) => parent.fd = Some(up),
                            // The level left was removed by someone else and its
                            // `..` leads nowhere: down again from the top, as when
                            // levels were forgotten (what was removed is gone), a
                            // bounded number of times.
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                                vanished += 1;
                                if vanished > DELETE_VANISHED {
                                    return Err(io::Error::other(StillFilled {
                                        path: PathBuf::new(),
                                    }));
                                }
                                levels.clear();
                                forgot = false;
                                top_cursor = Cursor {
                                    rounds: top_cursor.rounds,
                                    ..Cursor::default()
                                };
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    Some(_) => {}
                    // Its parent was forgotten: down again from the top, read
                    // from its start (what was removed in it and below is gone;
                    // going down into the same subdirectory again is no
                    // refilling, and no round).
                    None if forgot => {
                        forgot = false;
                        top_cursor = Cursor {
                            rounds: top_cursor.rounds,
                            ..Cursor::default()
                        };
                    }
                    None => {}
                }
            }
        }
    }
}

/// Reads the directory `dir` from where `cursor` says, removing each entry as it is
/// read, until a subdirectory that is not empty (opened, to go down into; the
/// cursor left at its entry, which is read again when the delete comes back) or a
/// read from the start that finds nothing.
///
/// Back from a subdirectory, the read goes on from its entry only if the first
/// entry there is that subdirectory (by inode); otherwise the positions moved under
/// the removals (or someone removed it), and the directory is read from its start
/// again, as a new pass and no round: what was removed is gone. A round is a read
/// from the start after a pass that reached the end having met entries: that pass
/// read on only from positions it checked, removing all it met, so with nobody
/// writing the next read from the start finds nothing.
fn read_level(
    dir: BorrowedFd<'_>,
    cursor: &mut Cursor,
    buf: &mut Vec<u8>,
    removed: &mut u64,
) -> io::Result<Read> {
    loop {
        match rustix::fs::seek(dir, rustix::fs::SeekFrom::Start(cursor.at)) {
            Ok(_) => {}
            // Removed by someone else while the delete was in it: done.
            Err(_) if removed_dir(dir) => return Ok(Read::Empty),
            Err(e) => return Err(e.into()),
        }
        let mut entries = rustix::fs::RawDir::new(dir, buf.spare_capacity_mut());
        let mut resuming = std::mem::take(&mut cursor.resuming);
        let mut moved = false;
        while let Some(e) = entries.next() {
            let e = match e {
                Ok(e) => e,
                // Removed by someone else while the delete was in it (`getdents`
                // of a removed directory): nothing is left in it, it is done.
                Err(_) if removed_dir(dir) => return Ok(Read::Empty),
                Err(e) => return Err(e.into()),
            };
            let next = e.next_entry_cookie();
            let name = OsStr::from_bytes(e.file_name().to_bytes());
            if name == "." || name == ".." {
                cursor.at = next;
                continue;
            }
            if std::mem::take(&mut resuming) && cursor.below.map(|(_, ino)| ino) != Some(e.ino()) {
                moved = true;
                break;
            }
            cursor.met = true;
            #[cfg(test)]
            tests::before_removal(dir, name, false);
            match remove_entry(dir, name, e.file_type())? {
                Removal::Removed => *removed += 1,
                Removal::Left => {}
                Removal::Down(sub) => {
                    let id = identity(sub.as_fd())?;
                    // The same subdirectory again: filled since it was emptied.
                    if cursor.below == Some(id) {
                        cursor.again().map_err(|_| {
                            io::Error::other(StillFilled {
                                path: PathBuf::from(name),
                            })
                        })?;
                    }
                    cursor.below = Some(id);
                    cursor.resuming = true;
                    return Ok(Read::Down(sub));
                }
            }
            cursor.at = next;
        }
        if moved || resuming {
            // The subdirectory gone down into is not where it was left (nor,
            // `resuming`, anything): a new pass from the start, no round.
            cursor.at = 0;
            cursor.met = false;
            continue;
        }
        // The end: empty when nothing was met since the read began at the start
        // (a read resumed past it met the entry it resumed at, at least).
        if !cursor.met {
            return Ok(Read::Empty);
        }
        cursor.again()?;
        cursor.at = 0;
        cursor.met = false;
    }
}

/// Whether the directory `dir` was removed (its link count 0): `getdents` of it
/// fails with ENOENT, and on ext4 `lseek` to a position read before fails with
/// EINVAL.
fn removed_dir(dir: BorrowedFd<'_>) -> bool {
    rustix::fs::fstat(dir).is_ok_and(|s| s.st_nlink == 0)
}

/// What became of one entry a delete read.
enum Removal {
    /// It was removed.
    Removed,
    /// It was gone already, or changed kind as often as it was tried (left for the
    /// next read of its directory).
    Left,
    /// A directory that is not empty, opened.
    Down(OwnedFd),
}

/// Removes the entry `name` of `dir`, `kind` as its directory entry says (a hint
/// only: it is removed as what it is when removed). A directory that is not empty
/// is opened (`O_NOFOLLOW`) for the delete to go down into; one swapped for a
/// symlink or a file meanwhile is unlinked as what it has become.
fn remove_entry(dir: BorrowedFd<'_>, name: &OsStr, kind: FileType) -> io::Result<Removal> {
    use rustix::io::Errno;
    let mut as_dir = match kind {
        FileType::Directory => true,
        FileType::Unknown => rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Directory),
        _ => false,
    };
    // Each try acts on the entry as it is then; an entry that changes kind between
    // every try is left for the next read.
    for _ in 0..4 {
        if !as_dir {
            match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
                Ok(()) => return Ok(Removal::Removed),
                Err(Errno::NOENT) => return Ok(Removal::Left),
                Err(Errno::ISDIR) => as_dir = true,
                Err(e) => return Err(e.into()),
            }
            continue;
        }
        match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
            Ok(()) => return Ok(Removal::Removed),
            Err(Errno::NOENT) => return Ok(Removal::Left),
            Err(Errno::NOTDIR) => as_dir = false,
            Err(Errno::NOTEMPTY | Errno::EXIST) => {
                #[cfg(test)]
                tests::before_removal(dir, name, true);
                match child_dir(dir, name) {
                    Ok(sub) => return Ok(Removal::Down(sub)),
                    Err(e) if is_not_dir(&e) => as_dir = false,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removal::Left),
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Removal::Left)
}

/// How a usage walk counts a file with several hard links.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// Once per name (what copying the tree would write).
    PerName,
    /// Once per inode (by device and inode, as `du` does: what the tree takes).
    Once,
}

/// Inodes with links not yet seen that a usage walk remembers at most (about 4 MiB).
pub const MAX_LINKED: usize = 100_000;

/// Files and bytes (apparent sizes) of everything but directories under `dir`
/// (symlinks not followed), descending only into directories `descend` accepts (it
/// gets the entry and its depth, 0 for the entries of `dir`). With [`Links::Once`]
/// only inodes with more than one link are remembered, each until all its links
/// were seen, and at most [`MAX_LINKED`] at a time: a user with a shell can make
/// millions of linked files, and a walk's memory must not be theirs to choose (past
/// the cap, links count once per name).
///
/// A walk that did not see the whole tree is an error, never a smaller count: a
/// directory it could not open or list (made unreadable from a container, swapped
/// for a symlink or a file), an entry it could not `stat`, or a directory moved
/// while it was walked (see [`walk`]). A user can cause each from a shell, and a
/// partial count taken for the whole would hide what the walk missed from a quota.
/// Only what vanished while it was read is left out (it is not there to count).
pub fn usage(
    dir: BorrowedFd<'_>,
    links: Links,
    descend: &dyn Fn(&Entry, usize) -> bool,
) -> io::Result<(u64, u64)> {
    usage_capped(dir, links, descend, None, MAX_LINKED)
}

/// Files of some directories that a usage walk counts only in part (the staged
/// files of uploads in progress, whose bytes their quota reservation holds).
pub struct Covered<'a> {
    /// Whether the files directly in a directory (the entry, at its depth) may be
    /// covered.
    pub dir: &'a dyn Fn(&Entry, usize) -> bool,
    /// How many bytes of a file in such a directory are held elsewhere: `None`, none
    /// (it counts whole); `Some(n)`, its first `n` (it counts as a file, and for
    /// its bytes past `n`, only when it is larger). Asked only of files the walk
    /// counts (a further link of an inode already counted is not asked about).
    pub file: &'a mut dyn FnMut(&Entry) -> Option<u64>,
    /// Whether the walk must see a tree that did not change under it (a quota
    /// measurement): see [`Unsettled`].
    pub settled: bool,
}

/// How long a settled walk waits between noting when it begins and reading
/// anything ([`Unsettled`]): the kernel stamps a directory's change with a coarse
/// clock, up to a tick (at most 10 ms) behind the one the walk reads, so a change
/// made once it reads is stamped at or after that start, and one made before that
/// start is stamped before it (never taken for one made during the walk).
pub const SETTLE_MARGIN: std::time::Duration = std::time::Duration::from_millis(20);

/// The error of a settled usage walk ([`Covered::settled`]: a quota measurement)
/// that met a directory changed since the walk began (an entry made, removed or
/// renamed in it: its `mtime` or `ctime` later than the walk's start, or it was
/// removed or replaced), looked at as the walk entered it and as it left it, and
/// the top when it ends. A file renamed back and forth between two directories as
/// the walk reads them (the one it goes to read before, the one it comes from
/// after) is missed by a walk that reads each once: one of the two, read after the
/// rename, changed since the walk began, so such a walk's count may be short. The
/// walk goes on to its end and gives what it counted (`counted`): a quota
/// measurement walks again and takes the largest of its tries (see
/// `quota::committed`).
#[derive(Debug)]
pub struct Unsettled {
    /// The first directory found changed (its name; empty for the top).
    pub name: OsString,
    /// What the walk counted, files and bytes, though the tree changed under it.
    pub counted: (u64, u64),
}

/// What an [`Unsettled`] walk counted, if `e` is one.
pub fn unsettled_count(e: &io::Error) -> Option<(u64, u64)> {
    carried::<Unsettled>(e).map(|u| u.counted)
}

impl std::fmt::Display for Unsettled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the directory {:?} changed while it was measured (entries made, removed or renamed): a measurement that may have missed what moved counts for nothing",
            self.name
        )
    }
}

impl std::error::Error for Unsettled {}

/// Whether `st` changed at or after `since` (its `mtime` or `ctime`).
#[allow(clippy::unnecessary_cast)] // The field types differ between targets.
fn changed_since(st: &rustix::fs::Stat, since: (i64, i64)) -> bool {
    let m = (st.st_mtime as i64, st.st_mtime_nsec as i64);
    let c = (st.st_ctime as i64, st.st_ctime_nsec as i64);
    m >= since || c >= since
}

/// [`usage`], with the files `covered` says counted only in part.
pub fn usage_covered(
    dir: BorrowedFd<'_>,
    links: Links,
    descend: &dyn Fn(&Entry, usize) -> bool,
    covered: Covered<'_>,
) -> io::Result<(u64, u64)> {
    usage_capped(dir, links, descend, Some(covered), MAX_LINKED)
}

/// [`usage`] remembering at most `cap` linked inodes.
fn usage_capped(
    dir: BorrowedFd<'_>,
    links: Links,
    descend: &dyn Fn(&Entry, usize) -> bool,
    covered: Option<Covered<'_>>,
    cap: usize,
) -> io::Result<(u64, u64)> {
    struct Usage<'d, 'c> {
        files: u64,
        bytes: u64,
        /// Inodes with links not seen yet → how many.
        linked: Option<std::collections::HashMap<(u64, u64), u64>>,
        cap: usize,
        descend: &'d dyn Fn(&Entry, usize) -> bool,
        covered: Option<Covered<'c>>,
        /// Whether the directory about to be entered holds covered files.
        next: bool,
        /// For each directory entered below the top, whether it holds covered files.
        levels: Vec<bool>,
        /// When the walk began (less [`SETTLE_MARGIN`]), for a settled walk: each
        /// directory's device and inode as entered, below the top.
        since: Option<(i64, i64)>,
        dirs: Vec<(u64, u64)>,
        /// The first directory a settled walk found changed.
        changed: Option<OsString>,
    }
    impl Usage<'_, '_> {
        /// A settled walk's check of the directory `name`, `st` as it is now.
        fn settled(&mut self, st: &rustix::fs::Stat, name: &OsStr) {
            if self.since.is_some_and(|since| changed_since(st, since)) {
                self.unsettled(name);
            }
        }

        /// Notes `name` changed under a settled walk (the first one is named).
        fn unsettled(&mut self, name: &OsStr) {
            self.changed.get_or_insert_with(|| name.to_owned());
        }
    }
    impl Visitor for Usage<'_, '_> {
        fn entry(&mut self, _: BorrowedFd<'_>, e: &Entry, depth: usize) -> io::Result<bool> {
            if e.kind() == FileType::Directory {
                let descend = (self.descend)(e, depth);
                self.next = descend && self.covered.as_ref().is_some_and(|c| (c.dir)(e, depth));
                return Ok(descend);
            }
            let nlink = e.stat.st_nlink;
            if let (Some(linked), true) = (&mut self.linked, nlink > 1) {
                let id = (e.stat.st_dev, e.stat.st_ino);
                let room = linked.len() < self.cap;
                match linked.get_mut(&id) {
                    Some(left) => {
                        *left -= 1;
                        if *left == 0 {
                            linked.remove(&id);
                        }
                        return Ok(false);
                    }
                    // Past the cap, further inodes count once per name: more
                    // than they take (the safe side for a quota), never less.
                    None if room => {
                        linked.insert(id, nlink - 1);
                    }
                    None => {}
                }
            }
            let size = e.stat.st_size as u64;
            let held = match (&mut self.covered, self.levels.last()) {
                (Some(c), Some(true)) => (c.file)(e),
                _ => None,
            };
            match held {
                Some(n) if size <= n => {}
                // Saturating: sparse files' apparent sizes (up to 2^63 each on
                // tmpfs or XFS) could otherwise add up past 2^64 and wrap the total
                // to next to nothing, hiding real data from a quota.
                Some(n) => {
                    self.files += 1;
                    self.bytes = self.bytes.saturating_add(size - n);
                }
                None => {
                    self.files += 1;
                    self.bytes = self.bytes.saturating_add(size);
                }
            }
            Ok(false)
        }
        /// A directory that vanished since it was listed holds nothing to count;
        /// any other that cannot be opened (unreadable, swapped for a symlink or a
        /// file) stops the walk: its bytes would be missing from the count.
        fn unopened(&mut self, _: BorrowedFd<'_>, e: &Entry, err: io::Error) -> io::Result<()> {
            if err.kind() == io::ErrorKind::NotFound {
                return Ok(());
            }
            Err(io::Error::new(
                err.kind(),
                format!(
                    "cannot open the directory {:?}: {err}",
                    e.name.to_string_lossy()
                ),
            ))
        }
        fn enter(&mut self, dir: BorrowedFd<'_>, name: &OsStr, _: bool) -> io::Result<()> {
            self.levels.push(std::mem::take(&mut self.next));
            if self.since.is_some() {
                let st = rustix::fs::fstat(dir)?;
                self.settled(&st, name);
                let m = Meta::from(&st);
                self.dirs.push((m.st_dev, m.st_ino));
            }
            Ok(())
        }
        fn leave(&mut self, parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
            self.levels.pop();
            if self.since.is_some() {
                let was = self.dirs.pop();
                // Looked at again by its name, now that it was read: removed,
                // replaced or changed meanwhile, it may have sent entries where
                // the walk had been already.
                let now = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW).ok();
                let same = now.as_ref().is_some_and(|st| {
                    let m = Meta::from(st);
                    Some((m.st_dev, m.st_ino)) == was
                });
                match now {
                    Some(st) if same => self.settled(&st, name),
                    _ => self.unsettled(name),
                }
            }
            Ok(())
        }
    }
    let since = covered.as_ref().is_some_and(|c| c.settled).then(|| {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        std::thread::sleep(SETTLE_MARGIN);
        (
            i64::try_from(at.as_secs()).unwrap_or(i64::MAX),
            i64::from(at.subsec_nanos()),
        )
    });
    let mut u = Usage {
        files: 0,
        bytes: 0,
        linked: (links == Links::Once).then(Default::default),
        cap,
        descend,
        covered,
        next: false,
        levels: Vec::new(),
        since,
        dirs: Vec::new(),
        changed: None,
    };
    walk(dir, &mut u)?;
    // The top, once the walk is done with it.
    if u.since.is_some() {
        u.settled(&rustix::fs::fstat(dir)?, OsStr::new(""));
    }
    match u.changed {
        Some(name) => Err(io::Error::other(Unsettled {
            name,
            counted: (u.files, u.bytes),
        })),
        None => Ok((u.files, u.bytes)),
    }
}

/// Copies the regular files and directories under `src` into `dst` (symlinks are
/// neither followed nor copied); `skip` names top-level entries left out. Calls
/// `progress` after every file (`false`) and directory (`true`) copied, and between
/// the steps of a big file's copy (`false`, each [`COPY_STEP`] bytes): its error
/// stops the copy (a stop of the proxy). Returns the files and the bytes copied.
///
/// At most `budget` bytes are copied in all, in apparent size (a hole counts, as
/// the quota counts it): what was measured (and reserved) before the copy. A source
/// whose files grew past it meanwhile (a user who can write it can make a file of
/// any size, sparse, in an instant) stops the copy with an error, so the
/// destination never holds more than was reserved for it.
///
/// Each file is copied by its data (see [`copy_file`]): its holes stay holes, so a
/// sparse file costs the copy what it holds, not its apparent size.
pub fn copy_tree(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    skip: &[&str],
    budget: u64,
    progress: &mut dyn FnMut(bool) -> io::Result<()>,
) -> io::Result<(u64, u64)> {
    struct Copy<'a, 'b> {
        to: Trail<'a>,
        skip: &'b [&'b str],
        progress: &'b mut dyn FnMut(bool) -> io::Result<()>,
        budget: u64,
        files: u64,
        bytes: u64,
        /// [`copy_file`]'s buffer, made when first needed.
        buf: Vec<u8>,
    }
    impl Visitor for Copy<'_, '_> {
        fn entry(&mut self, src: BorrowedFd<'_>, e: &Entry, depth: usize) -> io::Result<bool> {
            if depth == 0 && self.skip.iter().any(|s| e.name == *s) {
                return Ok(false);
            }
            match e.kind() {
                FileType::Directory => Ok(true),
                FileType::RegularFile => {
                    // Only a file gone or swapped since it was listed is left out;
                    // any other failure to open it fails the clone, never a copy
                    // that passes for whole without it.
                    let from = match child_file(src, &e.name) {
                        Ok(from) => from,
                        Err(err) if is_gone(&err) => return Ok(false),
                        Err(err) => {
                            return Err(unopenable("file", &e.name.to_string_lossy(), &err))
                        }
                    };
                    let to = openat2(
                        self.to.current(),
                        e.name.as_os_str(),
                        OFlags::WRONLY
                            | OFlags::CREATE
                            | OFlags::EXCL
                            | OFlags::NOFOLLOW
                            | OFlags::CLOEXEC,
                        Mode::from_raw_mode(e.stat.st_mode & 0o777),
                        STRICT,
                    )?;
                    let left = self.budget - self.bytes;
                    let to = std::fs::File::from(to);
                    // A stop is met within a step of a big file too, not only
                    // between files (a copy of gigabytes ran on past the exit's
                    // bound, its partial copy left: an outside verifier's find).
                    let progress = &mut self.progress;
                    match copy_file(&from, &to, left, &mut self.buf, &mut || progress(false))? {
                        Some(len) => self.bytes += len,
                        None => {
                            return Err(io::Error::other(format!(
                                "the source grew while it was cloned: more than the {} bytes measured and reserved for the copy",
                                self.budget
                            )))
                        }
                    }
                    self.files += 1;
                    (self.progress)(false)?;
                    Ok(false)
                }
                _ => Ok(false),
            }
        }
        fn enter(&mut self, _: BorrowedFd<'_>, name: &OsStr, _: bool) -> io::Result<()> {
            let dst = self.to.current();
            match rustix::fs::mkdirat(dst, name, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            let sub = child_dir(dst, name)?;
            self.to.push(sub)
        }
        fn leave(&mut self, _: BorrowedFd<'_>, _: &OsStr) -> io::Result<()> {
            self.to.pop()?;
            (self.progress)(true)
        }
    }
    let mut c = Copy {
        to: Trail::new(dst),
        skip,
        progress,
        budget,
        files: 0,
        bytes: 0,
        buf: Vec::new(),
    };
    walk(src, &mut c)?;
    (c.progress)(true)?;
    Ok((c.files, c.bytes))
}

/// The most bytes one `copy_file_range`, or one read through the buffer, moves: a
/// bound on each step of a copy, and the buffer's size where there is one.
const COPY_STEP: usize = 1 << 20;

/// Copies the regular file `from` into `to` (new, empty, opened for writing), at
/// most `left` bytes of it in apparent size. Answers the destination's length, or
/// `None` when the file is longer than `left` (it grew past what was measured).
///
/// Its size is read once, at the start (`fstat`), and no more than that (nor
/// `left`) is copied: only its data extents (`SEEK_DATA`, `SEEK_HOLE`), at the same
/// offsets, by `copy_file_range` (in the kernel; reflinked where the file system
/// can) or, where that is refused, through `buf` (at most [`COPY_STEP`] bytes);
/// then the destination is cut or extended to that length, so holes, trailing ones
/// too, stay holes. A file system that does not report holes has the whole length
/// copied as data. The file is then looked at again: longer than `left` is growth
/// past the budget, as one byte more than the budget was before; shorter than the
/// length copied (it shrank meanwhile) makes the copy its size now, never longer.
/// Data written into a hole meanwhile may or may not be copied, as with any copy of
/// a file being written. Every loop moves forward through at most the length
/// copied, however the file changes under it.
fn copy_file(
    from: &std::fs::File,
    to: &std::fs::File,
    left: u64,
    buf: &mut Vec<u8>,
    step: &mut dyn FnMut() -> io::Result<()>,
) -> io::Result<Option<u64>> {
    let len = from.metadata()?.len().min(left);
    copy_data(from, to, len, buf, step)?;
    let now = from.metadata()?.len();
    if now > left {
        return Ok(None);
    }
    let len = len.min(now);
    to.set_len(len)?;
    Ok(Some(len))
}

/// Copies the data extents of `from` below `len` into `to` at the same offsets; see
/// [`copy_file`]. Stops early where the file ends before `len`; `step` is called
/// after each step of at most [`COPY_STEP`] bytes, and its error ends the copy.
fn copy_data(
    from: &std::fs::File,
    to: &std::fs::File,
    len: u64,
    buf: &mut Vec<u8>,
    step: &mut dyn FnMut() -> io::Result<()>,
) -> io::Result<()> {
    use rustix::fs::SeekFrom;
    use rustix::io::Errno;
    // Whether `copy_file_range` is used: until it is refused once.
    let mut in_kernel = true;
    let mut pos = 0;
    while pos < len {
        let start = match rustix::fs::seek(from, SeekFrom::Data(pos)) {
            Ok(at) => at,
            // No data from `pos` on: the rest is a hole, or the file ended before.
            Err(Errno::NXIO) => return Ok(()),
            // Holes not reported here: all of it is data.
            Err(Errno::INVAL | Errno::OPNOTSUPP) => pos,
            Err(e) => return Err(e.into()),
        };
        if start >= len {
            return Ok(());
        }
        let end = match rustix::fs::seek(from, SeekFrom::Hole(start)) {
            Ok(at) => at,
            // The file ended before `start` since.
            Err(Errno::NXIO) => return Ok(()),
            Err(Errno::INVAL | Errno::OPNOTSUPP) => len,
            Err(e) => return Err(e.into()),
        };
        // A hole made at `start` since it was reported as data: one step is copied
        // as data, so that the loop moves on however the file changes.
        let end = if end > start {
            end
        } else {
            start.saturating_add(COPY_STEP as u64)
        };
        let end = end.min(len);
        if !copy_range(from, to, (start, end), &mut in_kernel, buf, step)? {
            return Ok(());
        }
        pos = end;
    }
    Ok(())
}

/// Copies the bytes of `from` in `start..end` into `to` at the same offsets;
/// answers whether all were there (`false`: the file ends before `end`).
fn copy_range(
    from: &std::fs::File,
    to: &std::fs::File,
    (start, end): (u64, u64),
    in_kernel: &mut bool,
    buf: &mut Vec<u8>,
    stepped: &mut dyn FnMut() -> io::Result<()>,
) -> io::Result<bool> {
    use rustix::io::Errno;
    use std::os::unix::fs::FileExt as _;
    let mut at = start;
    while at < end {
        if at > start {
            stepped()?;
        }
        let step = usize::try_from(end - at)
            .unwrap_or(usize::MAX)
            .min(COPY_STEP);
        if *in_kernel {
            let (mut off_in, mut off_out) = (at, at);
            match rustix::fs::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), step)
            {
                // The end of the file, or a file system that copies nothing
                // without saying why: a read tells which.
                Ok(0) => match from.read_at(&mut [0u8], at) {
                    Ok(0) => return Ok(false),
                    Ok(_) => *in_kernel = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                },
                Ok(n) => {
                    at += n as u64;
                    continue;
                }
                Err(Errno::INTR) => continue,
                // Not between these files here (another file system, an older
                // kernel, a filter refusing the call): through the buffer from now on.
                Err(
                    Errno::XDEV
                    | Errno::INVAL
                    | Errno::OPNOTSUPP
                    | Errno::NOSYS
                    | Errno::PERM
                    | Errno::TXTBSY,
                ) => *in_kernel = false,
                Err(e) => return Err(e.into()),
            }
        }
        if buf.is_empty() {
            buf.resize(COPY_STEP, 0);
        }
        let n = match from.read_at(&mut buf[..step], at) {
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(true)
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

/// Whether opening an entry a walk listed failed because it is no longer there to
/// open as listed: gone (`ENOENT`), a symlink where none may be followed (`ELOOP`),
/// not a directory any more (`ENOTDIR`), or not a regular file or directory any more
/// (refused by [`reopen`] without being opened). The only failures a walk (an
/// archive, a clone) may skip: anything else (`EACCES`, `EMFILE`, a lease held on
/// the file, an I/O error) leaves out what is there, and fails the walk.
pub fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
        || is_not_dir(e)
        || (e.raw_os_error().is_none() && e.kind() == io::ErrorKind::InvalidInput)
}

/// The error of a walk that could not open its `what` (`file`, `directory`) `name`,
/// of the failure's kind.
pub fn unopenable(what: &str, name: &str, err: &io::Error) -> io::Error {
    io::Error::new(
        err.kind(),
        format!("cannot open the {what} {name:?}: {err}"),
    )
}

/// Whether opening a directory failed because the entry is not one (any more): a
/// symlink where none may be followed (`ELOOP`) or another kind of file (`ENOTDIR`).
pub fn is_not_dir(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error())
        || e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error())
}

/// The attack on a measurement's walk, for the tests of the walks that must not
/// be fooled by it (here and in `quota`).
#[cfg(test)]
pub(crate) mod flipping {
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// The size of the file flipped: a sparse file no count can miss unseen.
    pub(crate) const FLIPPED_BYTES: u64 = 1 << 40;

    /// Under `t` (made): 20 small directories `m00`..`m19` (a file each), `a/` and
    /// `z/`, and a sparse file of [`FLIPPED_BYTES`] a thread renames between
    /// `a/big` and `z/big` as fast as it can (the attack report's shape: a loop in
    /// C); with `writer`, the thread also makes and removes `m05/w` beside it (a
    /// busy scope). Until dropped.
    pub(crate) struct Flipping {
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Flipping {
        pub(crate) fn start(t: &Path, writer: bool) -> Self {
            for i in 0..20 {
                std::fs::create_dir_all(t.join(format!("m{i:02}"))).expect("dir");
                std::fs::write(t.join(format!("m{i:02}/f")), "f").expect("file");
            }
            std::fs::create_dir_all(t.join("a")).expect("a");
            std::fs::create_dir_all(t.join("z")).expect("z");
            std::fs::File::create(t.join("a/big"))
                .and_then(|f| f.set_len(FLIPPED_BYTES))
                .expect("sparse");
            let stop = Arc::new(AtomicBool::new(false));
            let thread = {
                let (stop, t) = (stop.clone(), t.to_owned());
                std::thread::spawn(move || {
                    let (a, z, w) = (t.join("a/big"), t.join("z/big"), t.join("m05/w"));
                    for i in 0..50_000_000u64 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let _ = std::fs::rename(&a, &z);
                        let _ = std::fs::rename(&z, &a);
                        if writer && i % 2 == 0 {
                            let _ = std::fs::write(&w, "w");
                        } else if writer {
                            let _ = std::fs::remove_file(&w);
                        }
                    }
                })
            };
            Self {
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for Flipping {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// How many paths [`open`] resolved on this thread (each a kernel
        /// resolution from a directory descriptor, the cost the bounds below count).
        pub(crate) static RESOLUTIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// The paths [`open`] resolved while `f` ran.
    pub(crate) fn resolutions<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let before = RESOLUTIONS.with(|n| n.get());
        let out = f();
        (out, RESOLUTIONS.with(|n| n.get()) - before)
    }

    thread_local! {
        /// What a test does in a delete between reading an entry and removing it
        /// (`false`), or between finding a directory not empty and opening it
        /// (`true`): a user's shell racing the delete, made deterministic.
        #[allow(clippy::type_complexity)]
        static BEFORE_REMOVAL: std::cell::RefCell<Option<Box<dyn FnMut(BorrowedFd<'_>, &OsStr, bool)>>> =
            std::cell::RefCell::new(None);
    }

    /// Runs the test's hook, if any (see [`BEFORE_REMOVAL`]).
    pub(crate) fn before_removal(dir: BorrowedFd<'_>, name: &OsStr, opening: bool) {
        BEFORE_REMOVAL.with(|h| {
            if let Some(f) = h.borrow_mut().as_mut() {
                f(dir, name, opening);
            }
        });
    }

    /// Sets the hook a delete calls before each removal on this thread.
    fn race(f: impl FnMut(BorrowedFd<'_>, &OsStr, bool) + 'static) {
        BEFORE_REMOVAL.with(|h| *h.borrow_mut() = Some(Box::new(f)));
    }

    /// The entries under `p` (not followed), counted as a delete counts them.
    fn count_under(p: &Path) -> u64 {
        let mut n = 0;
        for e in std::fs::read_dir(p).expect("read") {
            let e = e.expect("entry");
            n += 1;
            if e.file_type().expect("type").is_dir() {
                n += count_under(&e.path());
            }
        }
        n
    }

    /// A delete reading one entry at a time and remembering 5 levels removes
    /// nested wide levels, files, a chain deeper than its descriptors and its
    /// memory of levels, and symlinks to a file and a directory outside (the links
    /// go, their targets stay), counting every entry.
    #[test]
    fn a_delete_in_batches_of_one_entry_removes_wide_deep_trees_and_never_follows_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(outside.join("sub")).expect("outside");
        std::fs::write(outside.join("secret.txt"), "secret").expect("secret");
        std::fs::write(outside.join("sub/inner.txt"), "inner").expect("inner");
        let t = dir.path().join("t");
        for i in 0..40 {
            for j in 0..12 {
                let d = t.join(format!("w{i:03}")).join(format!("x{j:02}"));
                std::fs::create_dir_all(&d).expect("wide");
                if j % 3 == 0 {
                    std::fs::write(d.join("f"), "f").expect("file");
                }
                if j == 5 {
                    std::fs::create_dir_all(d.join("empty/deeper")).expect("nested");
                }
            }
            std::fs::write(t.join(format!("w{i:03}/g{i}")), "gg").expect("file");
        }
        let deep: PathBuf = std::iter::repeat_n("d", HELD * 2 + 7).collect();
        std::fs::create_dir_all(t.join(&deep)).expect("deep");
        std::fs::write(t.join(&deep).join("bottom"), "b").expect("bottom");
        std::os::unix::fs::symlink("../outside/secret.txt", t.join("to-file")).expect("link");
        std::os::unix::fs::symlink(outside.join("sub"), t.join("to-dir")).expect("link");
        std::os::unix::fs::symlink(&outside, t.join("w003/x04/to-outside")).expect("link");
        std::os::unix::fs::symlink(&outside, t.join(&deep).join("up")).expect("link");
        let expected = count_under(&t) + 1;
        assert!(std::mem::size_of::<Level>() <= 64, "a level as documented");
        let root = fd(dir.path());
        let n = remove_tree_with(root.as_fd(), OsStr::new("t"), DELETE_BATCH_LEAST, 5)
            .expect("removed");
        assert_eq!(n, expected);
        assert!(!t.exists());
        assert_eq!(
            std::fs::read_to_string(outside.join("secret.txt"))
                .ok()
                .as_deref(),
            Some("secret")
        );
        assert!(outside.join("sub/inner.txt").exists());
    }

    /// Entries swapped for symlinks to a directory outside while the delete runs,
    /// after the entry was read and before its removal, and after a directory was
    /// found not empty and before it is opened, are removed as the links they have
    /// become: the directory outside keeps everything, and what was moved aside
    /// too.
    #[test]
    fn a_delete_removes_directories_swapped_for_symlinks_as_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).expect("outside");
        std::fs::write(outside.join("keep"), "keep").expect("keep");
        let t = dir.path().join("t");
        for name in ["a", "b", "c"] {
            std::fs::create_dir_all(t.join(name)).expect("dir");
            std::fs::write(t.join(name).join("in"), "in").expect("in");
        }
        let (top, swapped) = (
            dir.path().to_owned(),
            std::rc::Rc::new(std::cell::Cell::new(0)),
        );
        let seen = swapped.clone();
        race(move |d, name, opening| {
            let swap = |aside: &str| {
                rustix::fs::renameat(d, name, fd(&top), aside).expect("aside");
                rustix::fs::symlinkat(top.join("outside"), d, name).expect("link");
                seen.set(seen.get() + 1);
            };
            match (name.to_str(), opening) {
                (Some("a"), false) => swap("a-aside"),
                (Some("b"), true) => swap("b-aside"),
                _ => {}
            }
        });
        let root = fd(dir.path());
        // `t`, `a` and `b` (links now), `c` and its file.
        assert_eq!(
            remove_tree_with(root.as_fd(), OsStr::new("t"), DELETE_BATCH_LEAST, 8).expect("rm"),
            5
        );
        assert_eq!(swapped.get(), 2, "both swaps happened");
        assert!(!t.exists());
        assert!(outside.join("keep").exists());
        assert!(dir.path().join("a-aside/in").exists());
        assert!(dir.path().join("b-aside/in").exists());
    }

    /// A directory refilled each time the delete is about to remove it stops the
    /// delete, naming it, once gone down into `DELETE_ROUNDS` times again after the
    /// first (each a refill: `DELETE_ROUNDS + 1` in all); what was removed is gone.
    #[test]
    fn a_delete_of_a_directory_refilled_as_fast_as_it_is_emptied_stops_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = dir.path().join("t");
        std::fs::create_dir_all(t.join("r")).expect("r");
        std::fs::create_dir_all(t.join("s")).expect("s");
        std::fs::write(t.join("s/gone"), "x").expect("file");
        let refills = std::rc::Rc::new(std::cell::Cell::new(0u32));
        let count = refills.clone();
        let r = t.join("r");
        race(move |_, name, opening| {
            if name == "r" && !opening {
                std::fs::write(r.join(format!("new{}", count.get())), "x").expect("refill");
                count.set(count.get() + 1);
            }
        });
        let root = fd(dir.path());
        let e = remove_tree(root.as_fd(), OsStr::new("t")).expect_err("stops");
        assert!(carried::<StillFilled>(&e).is_some(), "{e}");
        assert!(e.to_string().contains("\"t/r\""), "{e}");
        assert_eq!(refills.get(), DELETE_ROUNDS + 1);
        assert!(t.join("r").exists());
    }

    /// A directory of 600 subdirectories, each with a file, between runs of files,
    /// read a few entries at a time: with nobody writing, the delete removes all of
    /// it, counting every entry.
    #[test]
    fn a_delete_of_a_wide_directory_of_non_empty_subdirectories_removes_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let expected = runs_of_files_and_filled(&dir.path().join("t"), 12);
        assert_eq!(expected, 12 * (10 + 50 * 2));
        let root = fd(dir.path());
        let n = remove_tree_with(root.as_fd(), OsStr::new("t"), DELETE_BATCH_LEAST * 4, 8)
            .expect("removed");
        assert_eq!(n, expected + 1);
        assert!(!dir.path().join("t").exists());
    }

    /// The same, 1,000 subdirectories, on a ramfs, whose directory positions are
    /// ordinals (as tmpfs's were before Linux 6.6, and an overlayfs merged
    /// directory's opened again): a position read before entries ahead of it were
    /// removed points that many live entries further on when sought again. The
    /// delete sought back to it, skipped live subdirectories, needed a read from the
    /// start more for them, and stopped 503 `busy` after `DELETE_ROUNDS` with nobody
    /// writing; now a position is only read on from when the subdirectory gone down
    /// into is found there. Mounts a ramfs (root, as the tests run here and in CI:
    /// a mount refused fails the test).
    #[test]
    fn a_delete_where_positions_are_ordinals_removes_a_wide_directory_of_non_empty_subdirectories()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let _ramfs = Ramfs::mount(dir.path());
        for batch in [DELETE_BATCH_LEAST, DELETE_BATCH_LEAST * 4, DELETE_BATCH] {
            let expected = runs_of_files_and_filled(&dir.path().join("t"), 20);
            let root = fd(dir.path());
            let n = remove_tree_with(root.as_fd(), OsStr::new("t"), batch, DELETE_LEVELS)
                .unwrap_or_else(|e| panic!("batch {batch}: {e}"));
            assert_eq!(n, expected + 1, "batch {batch}");
            assert!(!dir.path().join("t").exists());
        }
    }

    /// Makes `t` with `runs` runs of 10 files then 50 subdirectories, each with one
    /// file, in that order as a ramfs lists them (the newest first); returns the
    /// entries under `t`.
    fn runs_of_files_and_filled(t: &Path, runs: usize) -> u64 {
        std::fs::create_dir_all(t).expect("t");
        let mut n = 0;
        for r in (0..runs).rev() {
            for i in (0..50).rev() {
                let d = t.join(format!("s{r:02}-{i:02}"));
                std::fs::create_dir(&d).expect("subdirectory");
                std::fs::write(d.join("f"), "f").expect("file");
                n += 2;
            }
            for i in (0..10).rev() {
                std::fs::write(t.join(format!("f{r:02}-{i:02}")), "f").expect("file");
                n += 1;
            }
        }
        n
    }

    /// A ramfs mounted on a directory while it lives, unmounted (lazily) when
    /// dropped, a failing test's too.
    struct Ramfs(PathBuf);

    impl Ramfs {
        /// Mounts a ramfs on `dir`; a mount refused fails the test.
        fn mount(dir: &Path) -> Self {
            Self::mount_as(dir, "ramfs")
        }

        /// Mounts a filesystem of type `kind` (ramfs, tmpfs) on `dir`.
        fn mount_as(dir: &Path, kind: &str) -> Self {
            let out = std::process::Command::new("mount")
                .args(["-t", kind, kind])
                .arg(dir)
                .output()
                .expect("run mount");
            assert!(
                out.status.success(),
                "this test mounts a ramfs on {}, which needs root (CAP_SYS_ADMIN): mount failed: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Self(dir.to_owned())
        }
    }

    impl Drop for Ramfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }

    /// Each of 20 subdirectories renamed while the delete empties it is not where
    /// the delete left its parent when it comes back: the parent is read from its
    /// start again, which is no round (were each one, 20 would be 503 `busy`), and
    /// everything goes, the renamed directories too. (The delete before read on
    /// from the position unchecked, and passed this too: the rule's own test.)
    #[test]
    fn a_delete_back_from_a_subdirectory_moved_reads_from_the_start_without_a_round() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = dir.path().join("t");
        for i in 0..20 {
            std::fs::create_dir_all(t.join(format!("s{i:02}"))).expect("dir");
            std::fs::write(t.join(format!("s{i:02}/f")), "f").expect("file");
        }
        let moved = std::rc::Rc::new(std::cell::Cell::new(0));
        let count = moved.clone();
        race(move |d, name, opening| {
            if name != "f" || opening {
                return;
            }
            let here = std::fs::read_link(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&d)
            ))
            .expect("the directory read");
            let base = here.file_name().and_then(|n| n.to_str()).expect("a name");
            if let Some(i) = base.strip_prefix('s') {
                std::fs::rename(&here, here.with_file_name(format!("m{i}"))).expect("moved");
                count.set(count.get() + 1);
            }
        });
        let root = fd(dir.path());
        let n = remove_tree_with(root.as_fd(), OsStr::new("t"), DELETE_BATCH_LEAST, 8)
            .expect("removed");
        assert_eq!(moved.get(), 20, "every subdirectory moved while emptied");
        assert_eq!(n, 20 * 2 + 1);
        assert!(!t.exists());
    }

    /// A subdirectory removed by someone else (`rm -rf`) while the delete is in
    /// it, between two of its batches, is done: the delete goes on with the rest
    /// and removes the whole tree, never an error (before: `getdents` of the
    /// removed directory failed with ENOENT, the delete answered 404 and left the
    /// tree). So too a chain removed below the delete deeper than the descriptors
    /// it holds, and a top removed while it is emptied.
    #[test]
    fn a_delete_goes_on_when_a_directory_it_is_in_is_removed_by_someone_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = dir.path().join("t");
        for i in 0..6 {
            let e = t.join(format!("d{i}/e"));
            std::fs::create_dir_all(&e).expect("dir");
            for j in 0..20 {
                std::fs::write(e.join(format!("f{j:02}")), "f").expect("file");
            }
        }
        let deep: PathBuf = std::iter::repeat_n("c", HELD + 8).collect();
        std::fs::create_dir_all(t.join("chain").join(&deep)).expect("deep");
        std::fs::write(t.join("chain").join(&deep).join("bottom"), "b").expect("bottom");
        let removed = std::rc::Rc::new(std::cell::Cell::new(0));
        let count = removed.clone();
        let chain = t.join("chain/c/c");
        race(move |d, name, opening| {
            if opening {
                return;
            }
            let here = std::fs::read_link(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&d)
            ))
            .expect("the directory read");
            if name == "f05" && here.ends_with("d2/e") || name == "bottom" {
                let gone = if name == "bottom" {
                    chain.clone()
                } else {
                    here
                };
                std::fs::remove_dir_all(&gone).expect("rm -rf");
                count.set(count.get() + 1);
            }
        });
        let root = fd(dir.path());
        remove_tree_with(root.as_fd(), OsStr::new("t"), DELETE_BATCH_LEAST, 8).expect("removed");
        assert_eq!(
            removed.get(),
            2,
            "both removed while the delete was in them"
        );
        assert!(!t.exists());
        // The top itself removed while it is emptied.
        let e = t.join("e");
        std::fs::create_dir_all(&e).expect("dir");
        for j in 0..20 {
            std::fs::write(e.join(format!("f{j:02}")), "f").expect("file");
        }
        let top = t.clone();
        race(move |_, name, opening| {
            if !opening && name == "f05" {
                std::fs::remove_dir_all(&top).expect("rm -rf the top");
            }
        });
        remove_tree_with(root.as_fd(), OsStr::new("t"), DELETE_BATCH_LEAST, 8).expect("removed");
        assert!(!t.exists());
        // Gone from the start: an error (404 through the API).
        let e = remove_tree_with(root.as_fd(), OsStr::new("t"), DELETE_BATCH_LEAST, 8)
            .expect_err("nothing to delete");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    /// Below `HELD` levels a delete goes back up by `..`; a directory moved out
    /// from under it meanwhile stops it rather than leading it up into another
    /// directory, whose entries it would remove.
    #[test]
    fn a_delete_that_climbs_by_dotdot_stops_when_its_path_moved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let deep: PathBuf = std::iter::repeat_n("d", HELD + 8).collect();
        std::fs::create_dir_all(dir.path().join("t").join(&deep)).expect("tree");
        std::fs::write(dir.path().join("t").join(&deep).join("f"), "f").expect("f");
        std::fs::write(dir.path().join("keep"), "keep").expect("keep");
        // Above the `HELD` levels the delete holds descriptors of, when at the bottom.
        let moved: PathBuf = std::iter::repeat_n("d", 4).collect();
        let (from, to) = (dir.path().join("t").join(&moved), dir.path().join("moved"));
        race(move |_, name, _| {
            if name == "f" && from.exists() {
                std::fs::rename(&from, &to).expect("moved away");
            }
        });
        let root = fd(dir.path());
        let e = remove_tree(root.as_fd(), OsStr::new("t")).expect_err("stops");
        assert!(e.to_string().contains("moved"), "{e}");
        assert!(
            dir.path().join("keep").exists(),
            "nothing beside the tree removed"
        );
        assert!(dir.path().join("moved").exists());
    }

    fn fd(p: &Path) -> OwnedFd {
        rustix::fs::open(p, DIR, Mode::empty()).expect("open")
    }

    fn os(parts: &[&str]) -> Vec<OsString> {
        parts.iter().map(OsString::from).collect()
    }

    /// A chain of 39 links at the end of a path is followed by the kernel in one
    /// resolution, and the file found as the entry of its real directory: a user's
    /// links cost a bounded number of resolutions, not one of the whole directory
    /// path per link (each of those can be 40 links of 4 KB targets).
    #[test]
    fn links_at_the_end_of_a_path_cost_one_resolution_not_one_each() {
        let tmp = tempfile::tempdir().expect("tmp");
        let top = tmp.path();
        std::fs::create_dir_all(top.join("d/real")).expect("dirs");
        std::fs::write(top.join("d/real/f"), b"x").expect("file");
        std::os::unix::fs::symlink("real/f", top.join("d/l39")).expect("link");
        for i in (0..39).rev() {
            std::os::unix::fs::symlink(format!("l{}", i + 1), top.join(format!("d/l{i}")))
                .expect("link");
        }
        let root = fd(top);
        let (located, n) = resolutions(|| locate(root.as_fd(), &os(&["d", "l0"])));
        let located = located.expect("located");
        assert!(n <= 3, "{n} resolutions for 40 links at the end of a path");
        let parent = located.parent.expect("an entry of a directory");
        assert_eq!(parent.name, OsString::from("f"));
        assert_eq!(
            identity(parent.dir.as_fd()).ok(),
            identity(fd(&top.join("d/real")).as_fd()).ok()
        );
        assert_eq!(identity(located.path.as_fd()).ok(), {
            let f = std::fs::File::open(top.join("d/real/f")).expect("file");
            identity(f.as_fd()).ok()
        });
        // One link more than the kernel follows in a resolution is a loop, as before.
        std::fs::remove_file(top.join("d/l39")).expect("rm");
        std::os::unix::fs::symlink("l40", top.join("d/l39")).expect("link");
        std::os::unix::fs::symlink("real/f", top.join("d/l40")).expect("link");
        let err = locate(root.as_fd(), &os(&["d", "l0"]))
            .err()
            .expect("a loop");
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::LOOP.raw_os_error())
        );
    }

    /// Without `/proc` (which this test cannot unmount, so it calls the fallback
    /// itself), the links at the end are followed one at a time to the same entry,
    /// never out, and 41 are a loop.
    #[test]
    fn without_proc_the_links_at_the_end_are_followed_one_at_a_time() {
        let tmp = tempfile::tempdir().expect("tmp");
        let top = tmp.path().join("vf");
        std::fs::create_dir_all(top.join("d/real")).expect("dirs");
        std::fs::write(top.join("d/real/f"), b"x").expect("file");
        std::os::unix::fs::symlink("real/f", top.join("d/l2")).expect("link");
        std::os::unix::fs::symlink("l2", top.join("d/l1")).expect("link");
        std::os::unix::fs::symlink("../../..", top.join("d/out")).expect("link");
        let root = fd(&top);
        let located = locate_link_by_link(root.as_fd(), &os(&["d", "l1"])).expect("located");
        let parent = located.parent.expect("parent");
        assert_eq!(parent.name, OsString::from("f"));
        assert_eq!(
            identity(parent.dir.as_fd()).ok(),
            identity(fd(&top.join("d/real")).as_fd()).ok()
        );
        let err = locate_link_by_link(root.as_fd(), &os(&["d", "out"]))
            .err()
            .expect("refused");
        assert!(is_escape(&err), "{err}");
        for i in 0..41 {
            std::os::unix::fs::symlink(format!("k{}", i + 1), top.join(format!("d/k{i}")))
                .expect("link");
        }
        std::os::unix::fs::symlink("real/f", top.join("d/k41")).expect("link");
        let err = locate_link_by_link(root.as_fd(), &os(&["d", "k0"]))
            .err()
            .expect("a loop");
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::LOOP.raw_os_error())
        );
    }

    /// What a link at the end leads to is found where it really is: through `..`,
    /// to the vfolder itself (no parent), to a directory, and never out (an absolute
    /// target, or `..` past the top).
    #[test]
    fn a_link_at_the_end_is_found_where_it_leads_and_never_out() {
        let tmp = tempfile::tempdir().expect("tmp");
        let top = tmp.path().join("vf");
        std::fs::create_dir_all(top.join("a/b")).expect("dirs");
        std::fs::write(top.join("a/g"), b"x").expect("file");
        std::os::unix::fs::symlink("../g", top.join("a/b/up")).expect("link");
        std::os::unix::fs::symlink("../..", top.join("a/b/top")).expect("link");
        std::os::unix::fs::symlink("..", top.join("a/b/dir")).expect("link");
        std::os::unix::fs::symlink("../../..", top.join("a/b/out")).expect("link");
        std::os::unix::fs::symlink("/etc/passwd", top.join("a/b/abs")).expect("link");
        let root = fd(&top);
        let up = locate(root.as_fd(), &os(&["a", "b", "up"])).expect("up");
        let p = up.parent.expect("parent");
        assert_eq!(p.name, OsString::from("g"));
        assert_eq!(
            identity(p.dir.as_fd()).ok(),
            identity(fd(&top.join("a")).as_fd()).ok()
        );
        let at_top = locate(root.as_fd(), &os(&["a", "b", "top"])).expect("top");
        assert!(at_top.parent.is_none());
        assert_eq!(
            identity(at_top.path.as_fd()).ok(),
            identity(root.as_fd()).ok()
        );
        let dir = locate(root.as_fd(), &os(&["a", "b", "dir"])).expect("dir");
        assert_eq!(dir.parent.map(|p| p.name), Some(OsString::from("a")));
        for escape in ["out", "abs"] {
            let err = locate(root.as_fd(), &os(&["a", "b", escape]))
                .err()
                .expect("refused");
            assert!(is_escape(&err), "{escape}: {err}");
        }
    }

    /// Makes `depth` nested directories `n0/n1/…` under `at`; returns the deepest.
    fn chain(at: &Path, depth: usize) -> PathBuf {
        let mut p = at.to_path_buf();
        for i in 0..depth {
            p.push(format!("n{i}"));
        }
        std::fs::create_dir_all(&p).expect("chain");
        p
    }

    /// A request's climbs are bounded in all, however its paths spread them: a
    /// directory found outside is not climbed again, and once the budget is spent
    /// every climb fails as too deep, for the staging check and for an archive's
    /// check of its listed directories alike.
    #[test]
    fn a_requests_climbs_are_bounded_in_all() {
        let tmp = tempfile::tempdir().expect("tmp");
        let top = tmp.path();
        std::fs::create_dir(top.join(".upload")).expect("staging");
        let inside = identity(fd(&top.join(".upload")).as_fd()).expect("id");
        let top_id = identity(fd(top).as_fd()).expect("id");
        let deep = chain(&top.join("a"), 60);
        std::fs::create_dir(deep.join("x")).expect("x");
        let mut known = std::collections::HashSet::new();
        let mut climbs = Climbs::with(100);
        // 61 levels up to the top, then 1 from a sibling below: the memory holds.
        assert!(
            !beneath_known(fd(&deep).as_fd(), inside, top_id, &mut known, &mut climbs)
                .expect("first")
        );
        assert!(!beneath_known(
            fd(&deep.join("x")).as_fd(),
            inside,
            top_id,
            &mut known,
            &mut climbs
        )
        .expect("again"));
        assert!(climbs.0 >= 100 - 63, "{climbs:?}");
        // Another chain as deep spends what is left.
        let other = chain(&top.join("b"), 60);
        let err = beneath_known(fd(&other).as_fd(), inside, top_id, &mut known, &mut climbs)
            .expect_err("past the budget");
        assert!(carried::<TooDeep>(&err).is_some(), "{err}");
        assert!(err.to_string().contains("too deep"), "{err}");
        // The archive's check of listed directories is bounded the same way.
        let listed = std::collections::HashSet::from([inside]);
        let mut climbs = Climbs::with(30);
        let err = inside_any(fd(&deep).as_fd(), &listed, top_id, &mut climbs)
            .expect_err("past the budget");
        assert!(carried::<TooDeep>(&err).is_some(), "{err}");
        let mut climbs = Climbs::with(100);
        assert!(!inside_any(fd(&deep).as_fd(), &listed, top_id, &mut climbs).expect("within"));
    }

    /// The deepest existing directory of a path with many missing levels below a
    /// link is found in a bounded number of resolutions from the top (one per link
    /// on the way), not one per missing level.
    #[test]
    fn the_deepest_existing_directory_costs_a_resolution_per_link_not_per_level() {
        let tmp = tempfile::tempdir().expect("tmp");
        let top = tmp.path();
        std::fs::create_dir_all(top.join("a/real/b")).expect("dirs");
        std::os::unix::fs::symlink("real", top.join("a/l")).expect("link");
        let root = fd(top);
        let mut parts = os(&["a", "l", "b"]);
        parts.extend((0..1000).map(|i| OsString::from(format!("m{i}"))));
        let (found, n) = resolutions(|| deepest_dir(root.as_fd(), &parts));
        let (dir, k) = found.expect("found");
        assert_eq!(k, 3, "a, l and b exist; m0 does not");
        assert_eq!(
            identity(dir.as_fd()).ok(),
            identity(fd(&top.join("a/real/b")).as_fd()).ok()
        );
        assert!(n <= 2, "{n} resolutions");
        // Under a file: not a directory.
        std::fs::write(top.join("a/real/b/file"), b"x").expect("file");
        let err =
            deepest_dir(root.as_fd(), &os(&["a", "l", "b", "file", "x"])).expect_err("refused");
        assert!(is_not_dir(&err), "{err}");
    }

    /// A listing keeps 80 bytes per entry besides its name (it kept 168 with the
    /// whole `Stat`), and what it keeps is what `statat` said.
    #[test]
    fn a_listed_entry_keeps_only_what_the_walks_read() {
        assert_eq!(std::mem::size_of::<Entry>(), 80);
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("f"), b"12345").expect("write");
        std::os::unix::fs::symlink("f", d.path().join("l")).expect("symlink");
        let dir = fd(d.path());
        let list = entries(dir.as_fd()).expect("entries");
        let names: Vec<_> = list.iter().map(|e| e.name.clone()).collect();
        assert_eq!(names, ["f", "l"]);
        for e in &list {
            let st = rustix::fs::statat(&dir, e.name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
                .expect("stat");
            assert_eq!(e.stat, Meta::from(&st));
        }
        assert_eq!(list[0].stat.st_size, 5);
        assert_eq!(list[1].kind(), FileType::Symlink);
    }

    /// Records what a walk visits: each entry's path from the top, and its kind.
    #[derive(Default)]
    struct Seen {
        path: Vec<OsString>,
        next: Option<OsString>,
        seen: Vec<(PathBuf, FileType)>,
        /// Run once at the first file visited at depth `hook.0`.
        hook: Option<(usize, Box<dyn FnMut()>)>,
    }
    impl Visitor for Seen {
        fn entry(&mut self, _: BorrowedFd<'_>, e: &Entry, depth: usize) -> io::Result<bool> {
            let mut p: PathBuf = self.path.iter().collect();
            p.push(&e.name);
            self.seen.push((p, e.kind()));
            if e.kind() == FileType::Directory {
                self.next = Some(e.name.clone());
                return Ok(true);
            }
            if self.hook.as_ref().is_some_and(|(d, _)| *d == depth) {
                if let Some((_, mut f)) = self.hook.take() {
                    f();
                }
            }
            Ok(false)
        }
        fn enter(&mut self, _: BorrowedFd<'_>, name: &OsStr, _: bool) -> io::Result<()> {
            assert_eq!(self.next.take().as_deref(), Some(name));
            self.path.push(name.to_owned());
            Ok(())
        }
        fn leave(&mut self, _: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
            assert_eq!(self.path.pop().as_deref(), Some(name));
            Ok(())
        }
    }

    /// Every entry under `p` (not followed), as paths from `p`, sorted.
    fn listed(p: &Path, under: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).expect("read") {
            let e = e.expect("entry");
            out.push(under.join(e.file_name()));
            if e.file_type().expect("type").is_dir() {
                listed(&e.path(), &under.join(e.file_name()), out);
            }
        }
    }

    /// A wide directory of non-empty subdirectories, files among them, and a chain
    /// deeper than the descriptors held.
    fn wide_tree(t: &Path, width: usize) {
        for i in 0..width {
            let d = t.join(format!("{i:0>200}"));
            std::fs::create_dir(&d).expect("mkdir");
            if i % 7 == 0 {
                std::fs::create_dir(d.join("inner")).expect("inner");
                std::fs::write(d.join("inner").join("f"), "f").expect("f");
            }
            std::fs::write(t.join(format!("file{i}")), "x").expect("file");
        }
        let deep: PathBuf = std::iter::repeat_n("d", HELD + 8).collect();
        std::fs::create_dir_all(t.join(&deep)).expect("deep");
        std::fs::write(t.join(&deep).join("end"), "e").expect("end");
    }

    /// A walk goes down no more than its levels: a chain exactly that deep is
    /// walked whole, one a level deeper stops the walk with `WalkTooDeep` (and a
    /// usage measurement of it fails, never a count of its top levels), and what
    /// the walk held never grew past those levels.
    #[test]
    fn a_walk_deeper_than_its_levels_stops_with_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = dir.path().join("t");
        let levels = HELD + 8;
        let deep: PathBuf = std::iter::repeat_n("d", levels).collect();
        std::fs::create_dir_all(t.join(&deep)).expect("deep");
        std::fs::write(t.join(&deep).join("f"), "f").expect("f");
        let top = fd(&t);
        let mut v = Seen::default();
        walk_with(top.as_fd(), &mut v, WALK_BATCH, levels).expect("exactly as deep");
        assert_eq!(v.seen.len(), levels + 1);
        let mut v = Seen::default();
        let e = walk_with(top.as_fd(), &mut v, WALK_BATCH, levels - 1).expect_err("too deep");
        assert!(carried::<WalkTooDeep>(&e).is_some(), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("{} directory levels", levels - 1)),
            "{e}"
        );
        assert!(v.path.len() < levels, "never below its levels");
        // The real bound: a chain past it, made by a user's shell.
        let deeper: PathBuf = std::iter::repeat_n("e", WALK_LEVELS + 1).collect();
        let mut at = fd(&t);
        for part in deeper.iter() {
            rustix::fs::mkdirat(&at, part, Mode::from_raw_mode(0o755)).expect("mkdir");
            at = child_dir(at.as_fd(), part).expect("open");
        }
        let e = usage(top.as_fd(), Links::Once, &|_, _| true).expect_err("not measured");
        assert!(carried::<WalkTooDeep>(&e).is_some(), "{e}");
        drop(at);
        remove_tree(fd(dir.path()).as_fd(), OsStr::new("t")).expect("deleted");
    }

    /// A file renamed back and forth between two directories while a quota
    /// measurement (a settled walk) reads them (the attack's shape: `a/big` and
    /// `z/big` flipped by a loop in C): each walk counts it or is refused as
    /// `Unsettled`, never a count without it. Before, many walks missed it (read
    /// `a/` while it was in `z/` and `z/` while it was in `a/`), and uploads were
    /// admitted into a full scope.
    #[test]
    fn a_settled_walk_never_misses_a_file_renamed_back_and_forth_as_it_walks() {
        use super::flipping::{Flipping, FLIPPED_BYTES as big};
        let dir = tempfile::tempdir().expect("tempdir");
        let t = dir.path().join("t");
        let flipping = Flipping::start(&t, false);
        let top = fd(&t);
        let (mut counted, mut missed, mut refused) = (0, 0, 0);
        for _ in 0..1_000 {
            let mut file = |_: &Entry| None;
            let r = usage_covered(
                top.as_fd(),
                Links::Once,
                &|_, _| true,
                Covered {
                    dir: &|_, _| false,
                    file: &mut file,
                    settled: true,
                },
            );
            match r {
                Ok((_, bytes)) if bytes >= big => counted += 1,
                Ok(_) => missed += 1,
                Err(e) if carried::<Unsettled>(&e).is_some() => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        drop(flipping);
        assert_eq!(missed, 0, "counted {counted}, refused {refused}");
        assert!(refused > 0, "the flips were seen: counted {counted}");
        // Settled, the same tree is measured whole.
        let mut file = |_: &Entry| None;
        let (_, bytes) = usage_covered(
            top.as_fd(),
            Links::Once,
            &|_, _| true,
            Covered {
                dir: &|_, _| false,
                file: &mut file,
                settled: true,
            },
        )
        .expect("measured");
        assert!(bytes >= big);
    }

    /// Walks `t` (batches of `batch` bytes) and checks it visited every entry
    /// once, each subdirectory entered under the name it was visited by.
    fn walks_whole(t: &Path, batch: usize) {
        let top = fd(t);
        let mut v = Seen::default();
        walk_with(top.as_fd(), &mut v, batch, WALK_LEVELS).expect("walked");
        let mut got: Vec<PathBuf> = v.seen.into_iter().map(|(p, _)| p).collect();
        got.sort();
        let mut want = Vec::new();
        listed(t, Path::new(""), &mut want);
        want.sort();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "every entry once");
    }

    thread_local! {
        /// Whether this thread's walks list every entry's type as unknown.
        pub(super) static TYPES_HIDDEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// A directory renamed within its parent while the walk is in it is met again
    /// under its new name (on tmpfs a new name lands at the end of the listing) and
    /// walked again; renamed at each visit it would be walked as often as its
    /// parent's reads allow, and each level below as often again: the walk stops
    /// once it went into `WALK_AGAIN` more directories than it listed.
    #[test]
    fn a_walk_through_directories_renamed_as_it_goes_stops() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mount = Ramfs::mount_as(dir.path(), "tmpfs");
        for d in ["s0", "s1", "s2", "s3"] {
            std::fs::create_dir_all(dir.path().join("t").join(d)).expect("mkdir");
            std::fs::write(dir.path().join("t").join(d).join("f"), "f").expect("f");
        }
        struct Renamer {
            top: PathBuf,
            entered: u64,
        }
        impl Visitor for Renamer {
            fn entry(&mut self, _: BorrowedFd<'_>, _: &Entry, _: usize) -> io::Result<bool> {
                Ok(true)
            }
            fn enter(&mut self, _: BorrowedFd<'_>, name: &OsStr, _: bool) -> io::Result<()> {
                self.entered += 1;
                let mut to = name.to_owned();
                to.push("x");
                std::fs::rename(self.top.join(name), self.top.join(to))
            }
        }
        let top = fd(&dir.path().join("t"));
        let mut v = Renamer {
            top: dir.path().join("t"),
            entered: 0,
        };
        let e = walk(top.as_fd(), &mut v).expect_err("the walk stops");
        assert!(e.to_string().contains("renamed"), "{e}");
        assert_eq!(
            v.entered,
            4 + WALK_AGAIN,
            "the 4 listed, then again and again"
        );
        drop(mount);
    }

    /// Where a listing gives no entry's type (NFS without `READDIRPLUS`, XFS without
    /// `ftype`), a walk visits every entry once, as where it does: the first read
    /// looks such entries up and visits the files, the second goes down into the
    /// directories and leaves the rest (both visited them before: usage counted
    /// twice, an archive held each file twice, a clone failed on the second copy).
    #[test]
    fn a_walk_where_listings_give_no_types_visits_every_entry_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, _) = tree_and_outside(dir.path());
        std::fs::create_dir(t.join("wide")).expect("mkdir");
        wide_tree(&t.join("wide"), 50);
        TYPES_HIDDEN.with(|h| h.set(true));
        walks_whole(&t, 1);
        walks_whole(&t, WALK_BATCH);
        let top = fd(&t);
        let hidden = usage(top.as_fd(), Links::Once, &|_, _| true).expect("usage");
        TYPES_HIDDEN.with(|h| h.set(false));
        let listed = usage(top.as_fd(), Links::Once, &|_, _| true).expect("usage");
        assert_eq!(hidden, listed, "counted once, types listed or not");
    }

    /// A walk reading one entry at a time (and one of 32 KiB) visits every entry
    /// of a wide directory of subdirectories once, holding none of their names
    /// (the walk had to hold all 2,000 names of 200 bytes before).
    #[test]
    fn a_walk_in_batches_of_one_entry_visits_a_wide_tree_whole_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        wide_tree(dir.path(), 2_000);
        walks_whole(dir.path(), 1);
        walks_whole(dir.path(), WALK_BATCH);
    }

    /// Where positions are ordinals (a ramfs), nothing the walk does moves them: a
    /// wide tree is walked whole, every entry once.
    #[test]
    fn a_walk_where_positions_are_ordinals_visits_a_wide_tree_whole_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ram = Ramfs::mount(dir.path());
        wide_tree(dir.path(), 2_000);
        walks_whole(dir.path(), 1);
        walks_whole(dir.path(), WALK_BATCH);
        drop(ram);
    }

    /// A tree `t/a/{h, b/f, c/g}` beside `outside/{b,c}/secret`.
    fn tree_and_outside(root: &Path) -> (PathBuf, PathBuf) {
        let t = root.join("t");
        for (d, f) in [("a/b", "f"), ("a/c", "g"), ("a", "h")] {
            std::fs::create_dir_all(t.join(d)).expect("mkdir");
            std::fs::write(t.join(d).join(f), f).expect("file");
        }
        let outside = root.join("outside");
        std::fs::create_dir_all(outside.join("b")).expect("outside");
        std::fs::create_dir_all(outside.join("c")).expect("outside");
        std::fs::write(outside.join("c").join("secret"), "s").expect("secret");
        std::fs::write(outside.join("b").join("secret"), "s").expect("secret");
        std::fs::create_dir(root.join("away")).expect("away");
        (t, outside)
    }

    /// The directory a walk is in swapped for a symlink to outside the top while
    /// it is read (`t/a` moved away, a link in its place): the walk stops, never
    /// reading on in the directory moved away nor following the link.
    #[test]
    fn a_walk_in_a_directory_swapped_for_a_symlink_stops_and_never_leaves_the_top() {
        for depth in [1, 2] {
            let dir = tempfile::tempdir().expect("tempdir");
            let (t, outside) = tree_and_outside(dir.path());
            let top = fd(&t);
            let (a, away) = (t.join("a"), dir.path().join("away").join("a"));
            let mut v = Seen {
                hook: Some((
                    depth,
                    Box::new(move || {
                        std::fs::rename(&a, &away).expect("moved away");
                        std::os::unix::fs::symlink(&outside, &a).expect("link");
                    }),
                )),
                ..Seen::default()
            };
            let e = walk(top.as_fd(), &mut v).expect_err("the walk stops");
            assert!(e.to_string().contains("moved"), "{e}");
            assert!(v.hook.is_none(), "swapped");
            let names: Vec<_> = v.seen.iter().map(|(p, _)| p.clone()).collect();
            assert!(!names.iter().any(|p| p.ends_with("secret")), "{names:?}");
            // Whichever of `b` and `c` came first, the other was not read on.
            let files = names
                .iter()
                .filter(|p| p.ends_with("f") || p.ends_with("g"))
                .count();
            assert!(files <= 1, "{names:?}");
        }
    }

    /// A directory above the one a walk is in, moved out of the top while it is
    /// read: the walk stops before it goes down anywhere else in it.
    #[test]
    fn a_walk_stops_when_a_directory_it_is_in_is_moved_out_of_the_top() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (t, _) = tree_and_outside(dir.path());
        // One level more: `t/x/a/{h, b/f, c/g}`, `t/x` moved away at `f` or `g`.
        std::fs::create_dir(dir.path().join("x")).expect("x");
        std::fs::rename(t.join("a"), dir.path().join("x").join("a")).expect("a");
        std::fs::rename(dir.path().join("x"), t.join("x")).expect("x");
        let top = fd(&t);
        let (x, away) = (t.join("x"), dir.path().join("away").join("x"));
        let mut v = Seen {
            hook: Some((
                3,
                Box::new(move || std::fs::rename(&x, &away).expect("moved away")),
            )),
            ..Seen::default()
        };
        let e = walk(top.as_fd(), &mut v).expect_err("the walk stops");
        assert!(e.to_string().contains("moved"), "{e}");
        let files = v
            .seen
            .iter()
            .filter(|(p, _)| p.ends_with("f") || p.ends_with("g"))
            .count();
        assert_eq!(files, 1, "{:?}", v.seen);
    }

    /// A directory someone keeps filling with subdirectories while it is walked
    /// (a thread making them as fast as it can): the walk ends, whole or stopped
    /// for it, within its bound of reads.
    #[test]
    fn a_walk_of_a_directory_refilled_for_ever_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = dir.path().join("t");
        std::fs::create_dir(&t).expect("t");
        for i in 0..200 {
            std::fs::create_dir(t.join(format!("s{i}"))).expect("mkdir");
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let filler = {
            let (t, stop) = (t.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 5_000_000 {
                    let _ = std::fs::create_dir(t.join(format!("n{i}")));
                    i += 1;
                }
            })
        };
        struct Slow(u64);
        impl Visitor for Slow {
            fn entry(&mut self, _: BorrowedFd<'_>, e: &Entry, _: usize) -> io::Result<bool> {
                self.0 += 1;
                // Slower than the filler: each subdirectory costs a little.
                std::thread::sleep(std::time::Duration::from_micros(200));
                Ok(e.kind() == FileType::Directory)
            }
        }
        let top = fd(&t);
        let mut v = Slow(0);
        let started = std::time::Instant::now();
        let out = walk(top.as_fd(), &mut v);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        filler.join().expect("filler");
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        if let Err(e) = out {
            assert!(e.to_string().contains("as fast as it is walked"), "{e}");
        }
        assert!(v.0 >= 200, "{}", v.0);
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
        let list: Vec<_> = ["d", "./d/", "d/e", "x/y", "x", "d", "z/d"]
            .iter()
            .map(|s| p(s))
            .collect();
        assert_eq!(outermost(&list), [0, 4, 6]);
        // The empty path (the vfolder itself) holds every other.
        let list: Vec<_> = ["d", ".", "x"].iter().map(|s| p(s)).collect();
        assert_eq!(outermost(&list), [1]);
        // One path 30 000 components deep, and prefixes of it: the outermost is the
        // shortest.
        let deep: Vec<OsString> = (0..30_000).map(|_| OsString::from("a")).collect();
        let mut list: Vec<Vec<OsString>> = (0..50).map(|n| deep[..30_000 - n].to_vec()).collect();
        list.push(p("b"));
        assert_eq!(outermost(&list), [49, 50]);
        let name = "n".repeat(NAME_MAX);
        assert_eq!(p(&format!("a/{name}")).len(), 2);
        assert!(matches!(
            components(format!("a/{name}x/b")),
            Err(PathError::NameTooLong(256))
        ));
        // A whole path of `PATH_MAX` bytes at most, counted as joined (`./` and
        // doubled slashes are not part of it).
        let longest = "ab/".repeat(PATH_MAX / 3 - 1) + "abc";
        assert_eq!(longest.len(), PATH_MAX);
        let made = |path: &str| components(path).map_err(|_| ()).map(to_make);
        assert_eq!(
            made(&longest).expect("valid").expect("at the limit").len(),
            PATH_MAX / 3
        );
        assert_eq!(
            made(&format!("./{}", longest.replace('/', "//")))
                .expect("valid")
                .expect("spelt longer")
                .len(),
            PATH_MAX / 3
        );
        assert!(matches!(
            made(&format!("{longest}d")),
            Ok(Err(PathError::PathTooLong(4096)))
        ));
        assert!(matches!(
            made(&"a/".repeat(32_768)),
            Ok(Err(PathError::PathTooLong(65_535)))
        ));
        // A longer path is still a path (one a user made is still reached).
        assert_eq!(
            components("a/".repeat(32_768)).expect("valid").len(),
            32_768
        );
        let e = mkdirs(root.as_fd(), &p("out/new/dir"), BENEATH).expect_err("out");
        assert!(is_escape(&e));
        assert!(!outside.path().join("new").exists());
        // Removing a symlink removes the link, never what it points at.
        assert_eq!(remove_tree(root.as_fd(), OsStr::new("out")).expect("rm"), 1);
        assert!(outside.path().join("secret").exists());
    }

    /// Below `HELD` levels a walk goes back up by `..`; a directory moved out from
    /// under the walk meanwhile stops it rather than leading it up into another
    /// directory (whose entries a recursive delete would then remove).
    #[test]
    fn a_walk_that_climbs_by_dotdot_stops_when_its_path_moved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let deep: PathBuf = std::iter::repeat_n("d", HELD + 8).collect();
        std::fs::create_dir_all(dir.path().join("t").join(&deep)).expect("tree");
        std::fs::write(dir.path().join("t").join(&deep).join("f"), "f").expect("f");
        std::fs::write(dir.path().join("keep"), "keep").expect("keep");
        let moved: PathBuf = std::iter::repeat_n("d", HELD + 4).collect();
        struct MoveAway {
            from: PathBuf,
            to: PathBuf,
            done: bool,
        }
        impl Visitor for MoveAway {
            fn entry(&mut self, dir: BorrowedFd<'_>, e: &Entry, _: usize) -> io::Result<bool> {
                if e.name == "f" && !self.done {
                    // The directory six levels up is moved to the volume's top.
                    std::fs::rename(&self.from, &self.to)?;
                    self.done = true;
                }
                if e.kind() != FileType::Directory {
                    rustix::fs::unlinkat(dir, e.name.as_os_str(), AtFlags::empty())?;
                }
                Ok(true)
            }
            fn leave(&mut self, parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
                Ok(rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)?)
            }
        }
        let top = fd(&dir.path().join("t"));
        let mut v = MoveAway {
            from: dir.path().join("t").join(&moved),
            to: dir.path().join("moved"),
            done: false,
        };
        let e = walk(top.as_fd(), &mut v).expect_err("the walk stops");
        assert!(e.to_string().contains("moved"), "{e}");
        assert!(v.done);
        assert!(
            dir.path().join("keep").exists(),
            "nothing beside the tree removed"
        );
        assert!(dir.path().join("moved").exists());
    }

    /// Apparent sizes that add up past 2^64 (two sparse files of 2^63 - 1 bytes, as
    /// tmpfs and XFS allow, and one more) count as the most there is, never wrapped
    /// round to the 1,000 bytes they would otherwise show: a user could hide any
    /// amount of real data in their holes from a quota.
    #[test]
    fn sizes_past_two_to_the_64th_count_as_the_most_not_wrapped() {
        // /dev/shm: a tmpfs, whose files may be 2^63 - 1 bytes long (ext4's end at
        // 2^44).
        let dir = tempfile::tempdir_in("/dev/shm").expect("a tempdir on tmpfs");
        for (name, len) in [("a", i64::MAX as u64), ("b", i64::MAX as u64), ("c", 1002)] {
            let f = std::fs::File::create(dir.path().join(name)).expect("create");
            f.set_len(len).expect("sparse length");
        }
        let root = fd(dir.path());
        assert_eq!(
            usage(root.as_fd(), Links::PerName, &|_, _| true).ok(),
            Some((3, u64::MAX))
        );
    }

    /// Counted once per inode, a file linked three times in the tree counts once; one
    /// whose other link is outside the tree counts once too (it is forgotten only
    /// when all its links were seen); per name, each link counts.
    #[test]
    fn hard_links_count_once_per_inode_or_per_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let top = dir.path().join("top");
        std::fs::create_dir_all(top.join("a/b")).expect("tree");
        std::fs::write(top.join("f"), [1u8; 100]).expect("f");
        std::fs::hard_link(top.join("f"), top.join("a/f2")).expect("link");
        std::fs::hard_link(top.join("f"), top.join("a/b/f3")).expect("link");
        std::fs::write(top.join("g"), [2u8; 10]).expect("g");
        std::fs::hard_link(top.join("g"), dir.path().join("g-outside")).expect("link");
        let root = fd(&top);
        assert_eq!(
            usage(root.as_fd(), Links::Once, &|_, _| true).ok(),
            Some((2, 110))
        );
        assert_eq!(
            usage(root.as_fd(), Links::PerName, &|_, _| true).ok(),
            Some((4, 310))
        );
        // A directory left out leaves its links out; the inode still counts once.
        assert_eq!(
            usage(root.as_fd(), Links::Once, &|e, depth| !(depth == 0
                && e.name == "a"))
            .ok(),
            Some((2, 110))
        );
    }

    /// The memory of a walk counting inodes once is capped: past the cap, further
    /// linked inodes count once per name, never less than they take.
    #[test]
    fn linked_inodes_past_the_cap_count_per_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..4 {
            std::fs::write(dir.path().join(format!("f{i}")), [0u8; 10]).expect("f");
            std::fs::hard_link(
                dir.path().join(format!("f{i}")),
                dir.path().join(format!("l{i}")),
            )
            .expect("link");
        }
        let root = fd(dir.path());
        let all = |_: &Entry, _: usize| true;
        assert_eq!(
            usage_capped(root.as_fd(), Links::Once, &all, None, 100).ok(),
            Some((4, 40))
        );
        // Two remembered at a time: the first links of four inodes are met before any
        // second link (names sorted or not), so at least two count twice.
        let (files, bytes) = usage_capped(root.as_fd(), Links::Once, &all, None, 2).expect("usage");
        assert!(
            (4..=8).contains(&files) && bytes == files * 10,
            "{files} {bytes}"
        );
        assert!(bytes >= 40);
        assert_eq!(
            usage_capped(root.as_fd(), Links::Once, &all, None, 0).ok(),
            Some((8, 80))
        );
    }

    /// Covered files count only past what is held of them, and only in the
    /// directories `Covered::dir` names (not below them, not elsewhere).
    #[test]
    fn covered_files_count_past_what_is_held() {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["stage", "stage/deeper", "other"] {
            std::fs::create_dir(dir.path().join(d)).expect("dir");
        }
        for f in ["stage/a", "stage/b", "stage/c", "stage/deeper/a", "other/a"] {
            std::fs::write(dir.path().join(f), [0u8; 10]).expect("f");
        }
        let root = fd(dir.path());
        let mut asked = Vec::new();
        let mut file = |e: &Entry| {
            asked.push(e.name.to_string_lossy().into_owned());
            match e.name.to_str() {
                Some("a") => Some(10),
                Some("b") => Some(4),
                _ => None,
            }
        };
        let counted = usage_covered(
            root.as_fd(),
            Links::PerName,
            &|_, _| true,
            Covered {
                dir: &|e, depth| depth == 0 && e.name == "stage",
                file: &mut file,
                settled: false,
            },
        );
        // stage/a held whole (not a file any more), stage/b past 4 bytes, the rest whole.
        assert_eq!(counted.ok(), Some((4, 6 + 10 + 10 + 10)));
        // Asked as the directory is read (in no particular order), each file once.
        asked.sort();
        assert_eq!(asked, ["a", "b", "c"]);
    }

    /// A usage walk that did not see the whole tree is an error, never the count of
    /// what it saw: a directory moved while the walk was below it (deeper than
    /// `HELD`, so climbing back by `..` finds another parent), or a directory it
    /// cannot open. One that vanished is not there to count.
    #[test]
    fn a_usage_walk_that_did_not_see_the_whole_tree_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let top = dir.path().join("top");
        let deep: PathBuf = std::iter::repeat_n("d", HELD + 8).collect();
        std::fs::create_dir_all(top.join("a").join(&deep)).expect("tree");
        std::fs::create_dir_all(top.join("z")).expect("z");
        std::fs::write(top.join("z/big"), [0u8; 1000]).expect("big");
        let root = fd(&top);
        assert_eq!(
            usage(root.as_fd(), Links::PerName, &|_, _| true).ok(),
            Some((1, 1000))
        );
        // A directory five levels above the bottom moves away as the walk reaches
        // the bottom: the walk stops on its way back up, before `z`.
        let moved = top
            .join("a")
            .join(std::iter::repeat_n("d", HELD + 3).collect::<PathBuf>());
        let to = dir.path().join("moved");
        let done = std::cell::Cell::new(false);
        let descend = |_: &Entry, depth: usize| {
            if depth == HELD + 8 && !done.replace(true) {
                std::fs::rename(&moved, &to).expect("move");
            }
            true
        };
        let e = usage(root.as_fd(), Links::PerName, &descend).expect_err("incomplete");
        assert!(done.get());
        assert!(e.to_string().contains("moved"), "{e}");
        // A directory that cannot be opened (here: swapped for a file as the walk
        // reaches it) is named in the error.
        std::fs::rename(&to, &moved).expect("back");
        let swapped = top.join("a/d");
        let once = std::cell::Cell::new(false);
        let swap = |e: &Entry, depth: usize| {
            if depth == 1 && e.name == "d" && !once.replace(true) {
                std::fs::rename(&swapped, dir.path().join("d")).expect("away");
                std::fs::write(&swapped, b"").expect("a file in its place");
            }
            true
        };
        let e = usage(root.as_fd(), Links::PerName, &swap).expect_err("incomplete");
        assert!(e.to_string().contains("\"d\""), "{e}");
        // One that vanished as the walk reached it holds nothing: the count is whole.
        std::fs::remove_file(&swapped).expect("the file");
        std::fs::rename(dir.path().join("d"), &swapped).expect("back");
        let gone = |e: &Entry, depth: usize| {
            if depth == 1 && e.name == "d" && swapped.exists() {
                std::fs::rename(&swapped, dir.path().join("elsewhere")).expect("away");
            }
            true
        };
        assert_eq!(
            usage(root.as_fd(), Links::PerName, &gone).ok(),
            Some((1, 1000))
        );
    }

    /// A chain deeper than `HELD` and a directory wide enough to matter are walked
    /// whole; the top is never removed by the walk itself.
    #[test]
    fn deep_and_wide_trees_are_walked_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let deep: PathBuf = std::iter::repeat_n("d", HELD * 3).collect();
        std::fs::create_dir_all(dir.path().join(&deep)).expect("tree");
        std::fs::write(dir.path().join(&deep).join("f"), "12345").expect("f");
        for i in 0..200 {
            std::fs::create_dir(dir.path().join(format!("w{i}"))).expect("wide");
            std::fs::write(dir.path().join(format!("w{i}/g")), "ab").expect("g");
        }
        let root = fd(dir.path());
        assert_eq!(
            usage(root.as_fd(), Links::PerName, &|_, _| true).ok(),
            Some((201, 405))
        );
        assert_eq!(
            remove_tree(root.as_fd(), OsStr::new("d")).expect("rm"),
            HELD as u64 * 3 + 1
        );
        assert_eq!(
            usage(root.as_fd(), Links::PerName, &|_, _| true).ok(),
            Some((200, 400))
        );
    }

    /// Whether the file system at `dir` keeps and reports holes (an all-hole file
    /// has no data to seek to).
    fn holes_at(dir: &Path) -> bool {
        let f = std::fs::File::create(dir.join(".probe")).expect("probe");
        f.set_len(1 << 20).expect("size");
        let holes = matches!(
            rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(0)),
            Err(rustix::io::Errno::NXIO)
        );
        std::fs::remove_file(dir.join(".probe")).expect("rm");
        holes
    }

    /// A sparse file's apparent size is what the budget counts: one longer than
    /// the budget stops the copy with the error of a source that grew, the copy
    /// no longer than the budget; one that fits is copied whole, its holes kept.
    #[test]
    fn a_sparse_file_counts_its_apparent_size_against_the_budget() {
        use std::os::unix::fs::{FileExt as _, MetadataExt as _};
        let src = tempfile::tempdir().expect("tempdir");
        let f = std::fs::File::create(src.path().join("big")).expect("big");
        f.set_len(64 << 20).expect("size");
        f.write_all_at(b"data", 1 << 20).expect("data");
        f.write_all_at(b"tail", (64 << 20) - 4).expect("data");
        drop(f);
        let holes = holes_at(src.path());
        for (budget, whole) in [(1 << 20, false), ((64 << 20) - 1, false), (64 << 20, true)] {
            let dst = tempfile::tempdir().expect("tempdir");
            let r = copy_tree(
                fd(src.path()).as_fd(),
                fd(dst.path()).as_fd(),
                &[],
                budget,
                &mut |_| Ok(()),
            );
            let copy = std::fs::metadata(dst.path().join("big")).expect("copy");
            assert!(copy.len() <= budget, "{} past {budget}", copy.len());
            if !whole {
                let e = r.expect_err("past the budget");
                assert_eq!(
                    e.to_string(),
                    format!("the source grew while it was cloned: more than the {budget} bytes measured and reserved for the copy")
                );
                continue;
            }
            assert_eq!(r.expect("copied"), (1, 64 << 20));
            assert_eq!(
                std::fs::read(dst.path().join("big")).expect("read"),
                std::fs::read(src.path().join("big")).expect("read")
            );
            if holes {
                assert!(copy.blocks() * 512 < 1 << 20, "{}", copy.blocks() * 512);
            }
        }
    }

    /// A copy told to stop (`progress` failing: the proxy stopping) stops within a
    /// step of a big file, not only between files: of a 16 MiB file, the copy
    /// holds the steps made before the third call, and the error is the one
    /// `progress` gave. Before, a copy of gigabytes ran on past the exit's bound and
    /// its partial copy was left (an outside verifier's find).
    #[test]
    fn a_copy_told_to_stop_stops_within_a_big_file() {
        let src = tempfile::tempdir().expect("tempdir");
        let dst = tempfile::tempdir().expect("tempdir");
        std::fs::write(src.path().join("big"), vec![7u8; 16 << 20]).expect("big");
        let mut calls = 0;
        let r = copy_tree(
            fd(src.path()).as_fd(),
            fd(dst.path()).as_fd(),
            &[],
            u64::MAX,
            &mut |_| {
                calls += 1;
                if calls >= 3 {
                    Err(io::Error::other("stopping"))
                } else {
                    Ok(())
                }
            },
        );
        assert_eq!(r.expect_err("stopped").to_string(), "stopping");
        let copied = std::fs::metadata(dst.path().join("big"))
            .expect("copy")
            .len();
        assert!(copied <= 3 * COPY_STEP as u64, "{copied} bytes copied");
    }

    /// A file shorter than the length it is copied to (it shrank since its size
    /// was read) is copied as far as it goes, without an error; the copy through
    /// the buffer (where `copy_file_range` is refused) is the same, and the buffer
    /// is one step long.
    #[test]
    fn a_file_that_ends_early_is_copied_as_far_as_it_goes() {
        use std::os::unix::fs::FileExt as _;
        let d = tempfile::tempdir().expect("tempdir");
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(d.path().join("src"), &bytes).expect("src");
        let from = std::fs::File::open(d.path().join("src")).expect("open");
        for in_kernel in [true, false] {
            let path = d.path().join(format!("dst-{in_kernel}"));
            let to = std::fs::File::create(&path).expect("dst");
            let mut buf = Vec::new();
            let mut k = in_kernel;
            assert!(
                !copy_range(&from, &to, (0, 10 << 20), &mut k, &mut buf, &mut || Ok(()))
                    .expect("copy")
            );
            assert_eq!(std::fs::read(&path).expect("read"), bytes);
            assert_eq!(buf.len(), if in_kernel { 0 } else { COPY_STEP });
            // A range in the middle lands at its offsets.
            let to = std::fs::File::create(&path).expect("dst");
            let mut k = in_kernel;
            assert!(
                copy_range(&from, &to, (70_000, 200_000), &mut k, &mut buf, &mut || Ok(
                    ()
                ))
                .expect("copy")
            );
            let mut got = vec![0u8; 130_000];
            to.sync_all().expect("sync");
            std::fs::File::open(&path)
                .expect("open")
                .read_exact_at(&mut got, 70_000)
                .expect("read");
            assert!(got == bytes[70_000..200_000]);
        }
        let to = std::fs::File::create(d.path().join("whole")).expect("dst");
        copy_data(&from, &to, 10 << 20, &mut Vec::new(), &mut || Ok(())).expect("copy");
        assert_eq!(std::fs::read(d.path().join("whole")).expect("read"), bytes);
    }

    /// A file whose blocks turn from data to holes and back while it is copied
    /// (another thread writing and punching them) is copied to its end every time:
    /// each loop moves on whatever the seeks answer, and every byte copied is one
    /// the file held, data or hole.
    #[test]
    fn a_file_alternating_data_and_holes_is_copied_to_its_end() {
        use std::os::unix::fs::FileExt as _;
        use std::sync::atomic::{AtomicBool, Ordering};
        const LEN: u64 = 8 << 20;
        let d = tempfile::tempdir().expect("tempdir");
        let f = std::fs::File::create(d.path().join("src")).expect("src");
        f.set_len(LEN).expect("size");
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let writer = f.try_clone().expect("clone");
        let thread = std::thread::spawn(move || {
            let block = [0xabu8; 4096];
            let mut i = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let at = (i * 4096 * 7) % LEN;
                writer.write_all_at(&block, at).expect("write");
                let punch = ((i + 3) * 4096 * 13) % LEN;
                if rustix::fs::fallocate(
                    &writer,
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                    punch,
                    4096,
                )
                .is_err()
                {
                    writer.write_all_at(&[0u8; 4096], punch).expect("zeros");
                }
                i += 1;
            }
        });
        let from = std::fs::File::open(d.path().join("src")).expect("open");
        let mut buf = Vec::new();
        for n in 0..30 {
            let path = d.path().join(format!("dst{n}"));
            let to = std::fs::File::create(&path).expect("dst");
            assert_eq!(
                copy_file(&from, &to, LEN, &mut buf, &mut || Ok(())).expect("copy"),
                Some(LEN)
            );
            let got = std::fs::read(&path).expect("read");
            assert_eq!(got.len() as u64, LEN);
            assert!(got.iter().all(|&b| b == 0 || b == 0xab));
            std::fs::remove_file(&path).expect("rm");
        }
        stop.store(true, Ordering::Relaxed);
        thread.join().expect("writer");
    }
}
