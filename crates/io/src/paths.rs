//! Paths read from data files, kept inside their root folder.

use std::path::{Component, Path, PathBuf};

/// A path from a data file that leaves the folder it is relative to.
#[derive(Debug, thiserror::Error)]
#[error("path `{path}` {why} `{root}`")]
pub struct PathError {
    pub path: PathBuf,
    pub root: PathBuf,
    pub why: &'static str,
}

/// `root/relative`, refusing a `relative` that is absolute or climbs out of `root` with `..`
/// (unless `allow_absolute`, for users who lay data out with absolute paths; `..` past the root
/// is refused either way when relative). The check is lexical: a symbolic link inside the root is
/// followed, since linking a data folder is how users lay out large datasets on other disks.
pub fn join_inside(root: &Path, relative: &Path, allow_absolute: bool) -> Result<PathBuf, PathError> {
    let err = |why| PathError { path: relative.to_path_buf(), root: root.to_path_buf(), why };
    if relative.is_absolute() || relative.components().any(|c| matches!(c, Component::Prefix(_))) {
        return if allow_absolute { Ok(relative.to_path_buf()) } else { Err(err("is absolute; it must be inside")) };
    }
    let mut depth = 0usize;
    for component in relative.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::ParentDir if depth == 0 => return Err(err("climbs out of")),
            Component::ParentDir => depth -= 1,
            _ => {}
        }
    }
    Ok(root.join(relative))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_their_root() {
        let root = Path::new("/data/images");
        assert_eq!(join_inside(root, Path::new("coco/1.jpg"), false).unwrap(), root.join("coco/1.jpg"));
        assert_eq!(join_inside(root, Path::new("a/../b.jpg"), false).unwrap(), root.join("a/../b.jpg"));
        for bad in ["../secret.png", "a/../../b.png", "/etc/passwd", "./../x"] {
            let e = join_inside(root, Path::new(bad), false).unwrap_err();
            assert!(e.to_string().contains(bad) && e.to_string().contains("/data/images"), "{e}");
        }
        assert_eq!(join_inside(root, Path::new("/mnt/x.jpg"), true).unwrap(), Path::new("/mnt/x.jpg"));
        assert!(join_inside(root, Path::new("../x.jpg"), true).is_err());
    }
}
