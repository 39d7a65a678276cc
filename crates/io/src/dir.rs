//! Multi-file outputs that are complete or absent.

use std::path::{Path, PathBuf};

use crate::Manifest;

/// A folder being written: files go into a hidden temporary sibling (`.NAME.partial`), and
/// [`commit`](Self::commit) writes the [`Manifest`] last, syncs, and renames the folder into place.
/// Dropped without a commit (an error part-way), the temporary folder is removed; a kill leaves it
/// behind under its temporary name, which the next `create` of the same target clears.
#[derive(Debug)]
pub struct AtomicDir {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl AtomicDir {
    /// Starts writing `target` (which may exist: it is replaced only at the commit).
    pub fn create(target: &Path) -> std::io::Result<Self> {
        let parent = target.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)?;
        let name = target.file_name().ok_or_else(|| std::io::Error::other("an output folder needs a name"))?;
        let tmp = parent.join(format!(".{}.partial", name.to_string_lossy()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir(&tmp)?;
        Ok(Self { tmp, target: target.to_path_buf(), committed: false })
    }

    /// Where the files go until the commit.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The folder's final name.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Writes the manifest, syncs the files, and renames the folder to its target. An existing
    /// target is moved aside first and removed after the rename, so a kill at any moment leaves
    /// either the old folder or the new one under the final name (or, between the two renames,
    /// the old one under `.NAME.old`, which [`recover`](Self::recover) puts back).
    pub fn commit(mut self) -> std::io::Result<PathBuf> {
        let name = self.target.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        crate::fault::point(&["commit", &name, "manifest"]);
        Manifest::write(&self.tmp)?;
        sync_dir(&self.tmp)?;
        let old = self.old_path();
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        if self.target.exists() {
            std::fs::rename(&self.target, &old)?;
            crate::fault::point(&["commit", &name, "rename"]);
        }
        std::fs::rename(&self.tmp, &self.target)?;
        if let Some(parent) = self.target.parent() {
            sync_dir(parent)?;
        }
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        self.committed = true;
        Ok(self.target.clone())
    }

    /// Puts back a folder a kill left moved aside between the two renames of a commit.
    pub fn recover(target: &Path) -> std::io::Result<()> {
        let old = Self { tmp: PathBuf::new(), target: target.to_path_buf(), committed: true }.old_path();
        if !target.exists() && old.exists() {
            tracing::warn!("{}: restored from {} (a commit was interrupted)", target.display(), old.display());
            std::fs::rename(&old, target)?;
        }
        Ok(())
    }

    fn old_path(&self) -> PathBuf {
        let name = self.target.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        self.target.with_file_name(format!(".{name}.old"))
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Flushes a folder's files (and the folder's own entries) to disk.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::File::open(entry.path())?.sync_all()?;
        } else if entry.file_type()?.is_dir() {
            sync_dir(&entry.path())?;
        }
    }
    // Syncing a folder makes its renames durable; some filesystems refuse it, which loses nothing.
    let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_complete_or_absent_and_replaces_the_old_one_whole() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("llm");
        {
            let dir = AtomicDir::create(&target).unwrap();
            std::fs::write(dir.path().join("model.safetensors"), b"half").unwrap();
            // Dropped before the commit (an error part-way): nothing under the final name.
        }
        assert!(!target.exists());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0, "the temporary folder is removed");

        let dir = AtomicDir::create(&target).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), b"first").unwrap();
        dir.commit().unwrap();
        Manifest::verify(&target).unwrap();

        let dir = AtomicDir::create(&target).unwrap();
        std::fs::write(dir.path().join("config.json"), b"second").unwrap();
        dir.commit().unwrap();
        assert!(!target.join("model.safetensors").exists(), "the old folder is replaced, not merged");
        assert_eq!(std::fs::read(target.join("config.json")).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("llm")]);
    }

    #[test]
    fn a_commit_killed_between_its_renames_is_recovered() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("model");
        let dir = AtomicDir::create(&target).unwrap();
        std::fs::write(dir.path().join("a"), b"1").unwrap();
        dir.commit().unwrap();
        // What a kill after the first rename leaves: the old folder moved aside, no target.
        std::fs::rename(&target, root.path().join(".model.old")).unwrap();
        AtomicDir::recover(&target).unwrap();
        assert_eq!(std::fs::read(target.join("a")).unwrap(), b"1");
    }
}
