//! Volumes, vfolder IDs and safe paths: every client- or manager-supplied path is
//! resolved under its vfolder root and refused if it could leave it (`..`, absolute
//! paths, symlinks pointing outside), before anything is touched.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

/// A path or ID that was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// No such volume.
    #[error("unknown volume {0:?}")]
    UnknownVolume(String),
    /// Not `<user|project>:<uuid>/<32 hex>` (or legacy 32 hex).
    #[error("invalid vfid {0:?}")]
    InvalidVfid(String),
    /// The path would leave the vfolder.
    #[error("path escapes the vfolder")]
    Escape,
    /// The vfolder does not exist.
    #[error("no such vfolder")]
    NoFolder,
}

/// A parsed vfolder ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vfid {
    /// `user` or `project` with its UUID, or none for legacy IDs.
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

    /// The quota scope's directory under a volume root.
    pub fn scope_dir(&self, root: &Path) -> PathBuf {
        match &self.scope {
            Some((kind, id)) => root.join(format!("{kind}-{}", id.simple())),
            None => root.join("legacy"),
        }
    }

    /// The folder's directory under a volume root.
    pub fn dir(&self, root: &Path) -> PathBuf {
        let hex = self.folder.simple().to_string();
        let scope = match &self.scope {
            Some((kind, id)) => format!("{kind}-{}", id.simple()),
            None => "legacy".into(),
        };
        root.join(scope)
            .join(&hex[0..2])
            .join(&hex[2..4])
            .join(&hex[4..])
    }
}

/// The configured volumes.
#[derive(Debug, Clone, Default)]
pub struct Volumes {
    /// Name → root directory (canonical).
    roots: HashMap<String, PathBuf>,
}

impl Volumes {
    /// Volumes from config; roots are created if missing.
    pub fn new(list: &[(String, PathBuf)]) -> std::io::Result<Self> {
        let mut roots = HashMap::new();
        for (name, path) in list {
            std::fs::create_dir_all(path)?;
            roots.insert(name.clone(), std::fs::canonicalize(path)?);
        }
        Ok(Self { roots })
    }

    /// Volume names.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.roots.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// A volume's root.
    pub fn root(&self, volume: &str) -> Result<&Path, PathError> {
        self.roots
            .get(volume)
            .map(PathBuf::as_path)
            .ok_or_else(|| PathError::UnknownVolume(volume.chars().take(100).collect()))
    }

    /// The directory of a vfolder (which may not exist yet).
    pub fn folder(&self, volume: &str, vfid: &str) -> Result<PathBuf, PathError> {
        Ok(Vfid::parse(vfid)?.dir(self.root(volume)?))
    }

    /// The directory of a quota scope named `user:<uuid>` or `project:<uuid>`.
    pub fn scope(&self, volume: &str, qsid: &str) -> Result<PathBuf, PathError> {
        let root = self.root(volume)?;
        let bad = || PathError::InvalidVfid(qsid.chars().take(100).collect());
        let (kind, id) = qsid.split_once(':').ok_or_else(bad)?;
        if kind != "user" && kind != "project" {
            return Err(bad());
        }
        let id = uuid::Uuid::parse_str(id).map_err(|_| bad())?;
        Ok(root.join(format!("{kind}-{}", id.simple())))
    }

    /// The scope directory of a vfolder.
    pub fn scope_of(&self, volume: &str, vfid: &str) -> Result<PathBuf, PathError> {
        Ok(Vfid::parse(vfid)?.scope_dir(self.root(volume)?))
    }

    /// The directory of an existing vfolder.
    pub fn existing_folder(&self, volume: &str, vfid: &str) -> Result<PathBuf, PathError> {
        let dir = self.folder(volume, vfid)?;
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(PathError::NoFolder)
        }
    }
}

/// Resolves `relpath` under `root`, refusing anything that could leave it: absolute
/// paths, `..`, and existing symlinks (anywhere on the path) that point outside.
pub fn resolve(root: &Path, relpath: &str) -> Result<PathBuf, PathError> {
    let rel = Path::new(relpath);
    let mut out = root.to_path_buf();
    for c in rel.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(PathError::Escape)
            }
        }
    }
    // The deepest existing ancestor must canonicalize inside the root (symlinks).
    let mut probe = out.as_path();
    loop {
        if probe.exists() || probe.symlink_metadata().is_ok() {
            let real = std::fs::canonicalize(probe).map_err(|_| PathError::Escape)?;
            if !real.starts_with(root) {
                return Err(PathError::Escape);
            }
            break;
        }
        match probe.parent() {
            Some(p) if p.starts_with(root) => probe = p,
            _ => break,
        }
    }
    Ok(out)
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

    #[test]
    fn traversal_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(dir.path()).expect("canon");
        std::fs::create_dir_all(root.join("sub")).expect("mkdir");
        assert_eq!(
            resolve(&root, "sub/a.txt").expect("inside"),
            root.join("sub/a.txt")
        );
        assert_eq!(
            resolve(&root, "./sub/./b").expect("inside"),
            root.join("sub/b")
        );
        for bad in ["../x", "sub/../../x", "/etc/passwd"] {
            assert_eq!(resolve(&root, bad), Err(PathError::Escape), "{bad}");
        }
        let outside = tempfile::tempdir().expect("outside");
        std::os::unix::fs::symlink(outside.path(), root.join("link")).expect("symlink");
        assert_eq!(resolve(&root, "link/file"), Err(PathError::Escape));
        std::os::unix::fs::symlink(root.join("sub"), root.join("inner")).expect("symlink");
        assert!(
            resolve(&root, "inner/file").is_ok(),
            "a symlink inside the folder is fine"
        );
    }
}
