//! Volumes and vfolder IDs: each volume keeps a directory descriptor of its root, and
//! vfolders and quota scopes are opened from it by the kernel (see `fsx`), never by
//! joining and checking strings.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{fsx, ApiError};

/// A path or ID that was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// No such volume.
    #[error("unknown volume {0:?}")]
    UnknownVolume(String),
    /// Not `<user|project>:<uuid>/<32 hex>` (or an old-style 32 hex).
    #[error("invalid vfid {0:?}")]
    InvalidVfid(String),
    /// The path would leave the vfolder.
    #[error("path escapes the vfolder (or follows a symlink out of it)")]
    Escape,
    /// A path component longer than any file system takes.
    #[error("a path component is {0} bytes long, more than the 255 bytes a file name may have")]
    NameTooLong(usize),
    /// A path longer than any file system path may be.
    #[error("the path is {0} bytes long, more than the 4095 bytes a path may have")]
    PathTooLong(usize),
    /// The vfolder does not exist.
    #[error("no such vfolder")]
    NoFolder,
}

/// A parsed vfolder ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vfid {
    /// `user` or `project` with its UUID, or none for old-style IDs (no quota scope).
    pub scope: Option<(String, uuid::Uuid)>,
    /// The folder's UUID.
    pub folder: uuid::Uuid,
}

impl Vfid {
    /// Parses `user:<uuid>/<hex>`, `project:<uuid>/<hex>` or a bare 32-hex ID.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        let bad = || PathError::InvalidVfid(s.chars().take(100).collect());
        let (scope, folder) = match s.split_once('/') {
            Some((scope, folder)) => {
                let (kind, id) = scope.split_once(':').ok_or_else(bad)?;
                if kind != "user" && kind != "project" {
                    return Err(bad());
                }
                let id = uuid::Uuid::parse_str(id).map_err(|_| bad())?;
                (Some((kind.to_owned(), id)), folder)
            }
            None => (None, s),
        };
        if folder.len() != 32 || !folder.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let folder = uuid::Uuid::parse_str(folder).map_err(|_| bad())?;
        Ok(Self { scope, folder })
    }

    /// The quota scope's directory name: the scope UUID's 32-hex simple form, as
    /// the platform's vfs backend names it (`QuotaScopeID.pathname`, no `user-` or
    /// `project-` prefix: a user and a project scope with the same UUID share one
    /// directory there too). `None` for an old-style vfid, which has no quota scope.
    pub fn scope_name(&self) -> Option<String> {
        self.scope.as_ref().map(|(_, id)| id.simple().to_string())
    }

    /// The folder's directory below a volume root, as components, laid out as the
    /// platform's vfs backend lays it out (`mangle_vfpath`):
    /// `<scope hex>/<xx>/<yy>/<rest>`, and an old-style vfid's directly under the
    /// root, `<xx>/<yy>/<rest>`.
    pub fn parts(&self) -> Vec<OsString> {
        let hex = self.folder.simple().to_string();
        let mut parts: Vec<OsString> = self.scope_name().into_iter().map(Into::into).collect();
        parts.extend([hex[0..2].into(), hex[2..4].into(), hex[4..].into()]);
        parts
    }
}

/// Whether `name`, an entry of a volume root, is a quota scope's directory (32 hex
/// digits, see [`Vfid::scope_name`]), rather than the first level (`<xx>`, two hex
/// digits) of old-style vfolders or anything else.
pub fn is_scope_dir(name: &std::ffi::OsStr) -> bool {
    name.len() == 32 && name.as_encoded_bytes().iter().all(u8::is_ascii_hexdigit)
}

/// Whether `name`, an entry of a volume root, is the first level of old-style
/// vfolders (`<xx>` of `<root>/<xx>/<yy>/<rest>`: two hex digits).
pub fn is_unscoped_level(name: &std::ffi::OsStr) -> bool {
    name.len() == 2 && name.as_encoded_bytes().iter().all(u8::is_ascii_hexdigit)
}

/// One configured volume: its canonical root and a directory descriptor of it that
/// every path under the volume is resolved from.
#[derive(Debug, Clone)]
struct Volume {
    path: PathBuf,
    fd: Arc<OwnedFd>,
}

/// The configured volumes.
#[derive(Debug, Clone, Default)]
pub struct Volumes {
    /// Name → root.
    roots: HashMap<String, Volume>,
}

impl Volumes {
    /// Volumes from config; roots are created if missing.
    pub fn new(list: &[(String, PathBuf)]) -> std::io::Result<Self> {
        let mut roots = HashMap::new();
        for (name, path) in list {
            std::fs::create_dir_all(path)?;
            let path = std::fs::canonicalize(path)?;
            let fd = rustix::fs::open(&path, fsx::DIR, rustix::fs::Mode::empty())?;
            roots.insert(
                name.clone(),
                Volume {
                    path,
                    fd: Arc::new(fd),
                },
            );
        }
        Ok(Self { roots })
    }

    /// Volume names.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.roots.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    fn get(&self, volume: &str) -> Result<&Volume, PathError> {
        self.roots
            .get(volume)
            .ok_or_else(|| PathError::UnknownVolume(volume.chars().take(100).collect()))
    }

    /// A volume's root.
    pub fn root(&self, volume: &str) -> Result<&Path, PathError> {
        Ok(&self.get(volume)?.path)
    }

    /// A descriptor of a volume's root.
    pub fn root_fd(&self, volume: &str) -> Result<BorrowedFd<'_>, PathError> {
        Ok(self.get(volume)?.fd.as_fd())
    }

    /// The directory of a vfolder (which may not exist yet), for keys and logs.
    pub fn folder(&self, volume: &str, vfid: &str) -> Result<PathBuf, PathError> {
        let v = Vfid::parse(vfid)?;
        Ok(self.root(volume)?.join(fsx::join(&v.parts())))
    }

    /// Parses a quota scope named `user:<uuid>` or `project:<uuid>` into its
    /// directory name: the UUID's 32-hex simple form, whatever the kind (see
    /// [`Vfid::scope_name`]).
    pub fn scope_name(qsid: &str) -> Result<String, PathError> {
        let bad = || PathError::InvalidVfid(qsid.chars().take(100).collect());
        let (kind, id) = qsid.split_once(':').ok_or_else(bad)?;
        if kind != "user" && kind != "project" {
            return Err(bad());
        }
        let id = uuid::Uuid::parse_str(id).map_err(|_| bad())?;
        Ok(id.simple().to_string())
    }

    /// The directory of a quota scope named `user:<uuid>` or `project:<uuid>` (a
    /// key for caches and reservations).
    pub fn scope(&self, volume: &str, qsid: &str) -> Result<PathBuf, PathError> {
        Ok(self.root(volume)?.join(Self::scope_name(qsid)?))
    }

    /// The scope directory of a vfolder (a key for caches and reservations). An
    /// old-style vfid has no quota scope: its key is the volume's root, which is
    /// never a scope's (nothing is ever reserved, measured or limited under it: see
    /// `quota::reserve`, which takes no scope name for it, and `quota::sync`, which
    /// walks only scope directories).
    pub fn scope_of(&self, volume: &str, vfid: &str) -> Result<PathBuf, PathError> {
        let root = self.root(volume)?;
        Ok(match Vfid::parse(vfid)?.scope_name() {
            Some(name) => root.join(name),
            None => root.to_path_buf(),
        })
    }

    /// Opens a scope directory by its directory name, no symlink followed.
    pub fn open_scope(&self, volume: &str, name: &str) -> std::io::Result<OwnedFd> {
        let root = self.root_fd(volume).map_err(std::io::Error::other)?;
        fsx::open(root, &[name.into()], fsx::DIR, fsx::STRICT)
    }

    /// Opens an existing vfolder's directory (no symlink followed on the way). Only
    /// a directory that is not there (`ENOENT`) is [`PathError::NoFolder`]: a
    /// vfolder the proxy cannot open (made unreadable by its user, descriptors or
    /// memory exhausted, an I/O error) is there all the same, and is
    /// [`ApiError::FolderUnavailable`]. Taken for a missing one, a delete was
    /// answered 410 (the manager forgot the vfolder, its data stayed) and a clone
    /// went into it.
    pub fn open_folder(&self, volume: &str, vfid: &str) -> Result<OwnedFd, ApiError> {
        let parts = Vfid::parse(vfid)?.parts();
        fsx::open(self.root_fd(volume)?, &parts, fsx::DIR, fsx::STRICT).map_err(|e| {
            if fsx::is_escape(&e) {
                PathError::Escape.into()
            } else if e.kind() == std::io::ErrorKind::NotFound {
                PathError::NoFolder.into()
            } else {
                ApiError::FolderUnavailable(e)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vfids() {
        let v = Vfid::parse(
            "user:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/5d6c8c1e9a4d4e6f8b7a1c2d3e4f5a6b",
        )
        .expect("valid");
        assert_eq!(v.scope.as_ref().map(|s| s.0.as_str()), Some("user"));
        assert!(Vfid::parse("5d6c8c1e9a4d4e6f8b7a1c2d3e4f5a6b").is_ok());
        for bad in [
            "",
            "x",
            "group:3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b/5d6c8c1e9a4d4e6f8b7a1c2d3e4f5a6b",
            "user:nope/5d6c",
            "../../etc",
        ] {
            assert!(Vfid::parse(bad).is_err(), "{bad}");
        }
    }

    /// The platform's layout (`QuotaScopeID.pathname`, `mangle_vfpath`): the scope
    /// UUID's 32 hex digits, whatever its kind, and an old-style vfid directly under
    /// the root.
    #[test]
    fn layout_is_the_platforms() {
        let names = |v: &Vfid| -> Vec<String> {
            v.parts()
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect()
        };
        let folder = "5d6c8c1e9a4d4e6f8b7a1c2d3e4f5a6b";
        let scope = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b";
        let want = [
            "3f2b8c1e9a4d4e6f8b7a1c2d3e4f5a6b",
            "5d",
            "6c",
            "8c1e9a4d4e6f8b7a1c2d3e4f5a6b",
        ];
        for kind in ["user", "project"] {
            let v = Vfid::parse(&format!("{kind}:{scope}/{folder}")).expect("valid");
            assert_eq!(names(&v), want);
            assert_eq!(v.scope_name().as_deref(), Some(want[0]));
            assert_eq!(
                Volumes::scope_name(&format!("{kind}:{scope}")).expect("valid"),
                want[0]
            );
        }
        let v = Vfid::parse(folder).expect("valid");
        assert_eq!(names(&v), &want[1..]);
        assert_eq!(v.scope_name(), None);
        assert!(is_scope_dir(std::ffi::OsStr::new(want[0])));
        assert!(!is_scope_dir(std::ffi::OsStr::new("5d")));
        assert!(is_unscoped_level(std::ffi::OsStr::new("5d")));
        assert!(!is_unscoped_level(std::ffi::OsStr::new(want[0])));
        assert!(!is_unscoped_level(std::ffi::OsStr::new("..")));
    }

    #[test]
    fn traversal_is_refused() {
        use rustix::fs::OFlags;
        let dir = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(dir.path()).expect("canon");
        std::fs::create_dir_all(root.join("sub")).expect("mkdir");
        std::fs::write(root.join("sub/a.txt"), "a").expect("file");
        let fd = rustix::fs::open(&root, fsx::DIR, rustix::fs::Mode::empty()).expect("open");
        let open = |rel: &str| {
            fsx::open(
                fd.as_fd(),
                &fsx::components(rel).map_err(|_| ())?,
                OFlags::RDONLY,
                fsx::BENEATH,
            )
            .map_err(|e| assert!(fsx::is_escape(&e), "{rel}: {e}"))
        };
        assert!(open("sub/a.txt").is_ok());
        assert!(open("./sub/./a.txt").is_ok());
        for bad in ["../x", "sub/../../x", "/etc/passwd"] {
            assert!(fsx::components(bad).is_err(), "{bad}");
        }
        let outside = tempfile::tempdir().expect("outside");
        std::fs::write(outside.path().join("file"), "x").expect("file");
        std::os::unix::fs::symlink(outside.path(), root.join("link")).expect("symlink");
        assert!(open("link/file").is_err());
        std::os::unix::fs::symlink(root.join("sub"), root.join("abs")).expect("symlink");
        assert!(
            open("abs/a.txt").is_err(),
            "an absolute link is never followed"
        );
        std::os::unix::fs::symlink("sub", root.join("inner")).expect("symlink");
        assert!(
            open("inner/a.txt").is_ok(),
            "a symlink inside the folder is fine"
        );
    }
}
