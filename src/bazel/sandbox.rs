//! Validates a request's `sandbox_dir`: Bazel's multiplex sandboxing puts each
//! request's files under a relative directory of the worker's cwd, and a
//! worker must not be talked into reading or writing outside that cwd.

use std::path::{Component, Path, PathBuf};

use crate::quote::quoted;

/// The directory a request's relative paths resolve against.
pub fn resolve(cwd: &Path, sandbox_dir: &str) -> Result<PathBuf, String> {
    if sandbox_dir.is_empty() {
        return Ok(cwd.to_path_buf());
    }
    let relative = Path::new(sandbox_dir);
    let sandbox_dir = quoted(sandbox_dir);
    if relative.is_absolute() {
        return Err(format!(
            "sandbox_dir '{sandbox_dir}' must be relative to the worker's directory"
        ));
    }
    if relative
        .components()
        .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(format!("sandbox_dir '{sandbox_dir}' must not contain '..'"));
    }
    let root = cwd
        .canonicalize()
        .map_err(|e| format!("worker directory {}: {e}", cwd.display()))?;
    // Canonicalizing resolves symlinks, so a link inside the cwd that points
    // elsewhere is caught here.
    let dir = cwd
        .join(relative)
        .canonicalize()
        .map_err(|e| format!("sandbox_dir '{sandbox_dir}': {e}"))?;
    if !dir.starts_with(&root) {
        return Err(format!(
            "sandbox_dir '{sandbox_dir}' resolves to {}, outside the worker's directory {}",
            dir.display(),
            root.display()
        ));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_nested_relative_dirs() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("__sandbox/3/root")).unwrap();
        let got = resolve(d.path(), "__sandbox/3/root").unwrap();
        assert_eq!(
            got,
            d.path().canonicalize().unwrap().join("__sandbox/3/root")
        );
        assert_eq!(resolve(d.path(), "").unwrap(), d.path());
    }

    #[test]
    fn rejects_escapes() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("link")).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        for bad in ["/tmp", "../x", "sub/../../x", "link", "missing"] {
            assert!(resolve(d.path(), bad).is_err(), "{bad} was accepted");
        }
    }
}
