//! Validates a request's `sandbox_dir`: the directory under the worker's cwd
//! where one request's files live. Bazel's multiplex sandboxing sends a
//! relative prefix (`__sandbox/<n>/<execroot>`); NativeLink starts the worker
//! in its root action directory and sends each action's own directory as an
//! absolute path below it (protocol facts §3a). A worker must serve both and
//! must not be talked into reading or writing outside its cwd.
//!
//! What is guaranteed: when a request arrives, its `sandbox_dir`, relative to
//! the cwd or absolute, is refused unless it has no `..`, exists, and, with
//! every symlink resolved, lies inside the worker's directory. The request
//! then works in that resolved, symlink-free path. Every request is checked
//! afresh; nothing is cached.
//!
//! What is not: the check and the tool's later file operations are separate
//! system calls. Someone who can write in the worker's directory can replace
//! a directory on the resolved path with a symlink after the check, and the
//! tool's writes follow it. Closing that gap would need every file operation
//! of every tool to go through `openat2(RESOLVE_BENEATH)`, which a worker
//! cannot impose on the tool it hosts. Whoever can do that swap can already
//! write to the build's files, so no one gains access they did not have.
//! Paths in the arguments themselves are the tool's business, as they are
//! for a compiler run by hand: the demo writes where it is told.

use std::path::{Component, Path, PathBuf};

use crate::quote::quoted;

/// The directory a request's relative paths resolve against: `cwd` itself
/// when `sandbox_dir` is empty, else `sandbox_dir` (relative to `cwd`, or
/// absolute) with symlinks resolved, provided it lies inside `cwd`.
pub fn resolve(cwd: &Path, sandbox_dir: &str) -> Result<PathBuf, String> {
    if sandbox_dir.is_empty() {
        return Ok(cwd.to_path_buf());
    }
    let path = Path::new(sandbox_dir);
    let sandbox_dir = quoted(sandbox_dir);
    // Refused even where it would resolve inside: a `..` in a path the
    // client built means the client is confused about where files are.
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("sandbox_dir '{sandbox_dir}' must not contain '..'"));
    }
    let root = cwd
        .canonicalize()
        .map_err(|e| format!("worker directory {}: {e}", cwd.display()))?;
    // `join` keeps an absolute path as it is. Canonicalizing resolves
    // symlinks, so a link that points elsewhere is caught here, and so is an
    // absolute path that names the cwd through a symlink of its own.
    let dir = cwd
        .join(path)
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

    /// A root with `sub/inner` inside it and a directory outside it.
    fn layout() -> (tempfile::TempDir, tempfile::TempDir) {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("sub/inner")).unwrap();
        (root, outside)
    }

    fn refused(root: &Path, sandbox_dir: &str) -> String {
        match resolve(root, sandbox_dir) {
            Ok(dir) => panic!("{sandbox_dir:?} was accepted as {}", dir.display()),
            Err(e) => e,
        }
    }

    #[test]
    fn rejects_parent_components_even_when_they_stay_inside() {
        let (root, _outside) = layout();
        // These exist and resolve inside the root, so only the `..` rule
        // refuses them; `sub/../..` exists too and leaves the root.
        for bad in ["sub/..", "sub/../sub/inner", "sub/inner/..", "sub/../.."] {
            let e = refused(root.path(), bad);
            assert!(e.contains("must not contain '..'"), "{bad}: {e}");
        }
    }

    #[test]
    fn accepts_absolute_dirs_inside_the_root() {
        let (root, _outside) = layout();
        let canonical = root.path().canonicalize().unwrap();
        let inside = canonical.join("sub/inner");
        assert_eq!(
            resolve(root.path(), inside.to_str().unwrap()).unwrap(),
            inside
        );
        // The root itself is inside.
        assert_eq!(
            resolve(root.path(), canonical.to_str().unwrap()).unwrap(),
            canonical
        );
        // Named through a symlink that lives outside the root but points in:
        // what counts is where it resolves.
        let alias = tempfile::tempdir().unwrap();
        let link = alias.path().join("to-root");
        std::os::unix::fs::symlink(&canonical, &link).unwrap();
        let via_link = link.join("sub");
        assert_eq!(
            resolve(root.path(), via_link.to_str().unwrap()).unwrap(),
            canonical.join("sub")
        );
    }

    #[test]
    fn rejects_absolute_dirs_outside_the_root_naming_the_path() {
        let (root, outside) = layout();
        let out = outside.path().canonicalize().unwrap();
        for bad in [out.to_str().unwrap(), "/"] {
            let e = refused(root.path(), bad);
            assert!(
                e.contains(&format!("sandbox_dir '{bad}'"))
                    && e.contains("outside the worker's directory"),
                "{bad}: {e}"
            );
        }
        // A sibling whose name starts with the root's is still outside.
        let sibling = PathBuf::from(format!(
            "{}-x",
            root.path().canonicalize().unwrap().display()
        ));
        std::fs::create_dir(&sibling).unwrap();
        let e = refused(root.path(), sibling.to_str().unwrap());
        std::fs::remove_dir(&sibling).unwrap();
        assert!(e.contains("outside the worker's directory"), "{e}");
    }

    #[test]
    fn absolute_dirs_keep_the_other_rules() {
        let (root, outside) = layout();
        let canonical = root.path().canonicalize().unwrap();
        let dotdot = format!("{}/sub/../sub/inner", canonical.display());
        assert!(refused(root.path(), &dotdot).contains("must not contain '..'"));
        let missing = format!("{}/sub/missing", canonical.display());
        assert!(refused(root.path(), &missing).contains("No such file"));
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
        let link = format!("{}/link", canonical.display());
        assert!(refused(root.path(), &link).contains("outside the worker's directory"));
    }

    #[test]
    fn rejects_symlinks_out_of_the_root() {
        let (root, outside) = layout();
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("sub/deep")).unwrap();
        // A link inside the root to a place inside the root is fine.
        std::os::unix::fs::symlink("sub/inner", root.path().join("near")).unwrap();
        for bad in ["link", "sub/deep"] {
            let e = refused(root.path(), bad);
            assert!(e.contains("outside the worker's directory"), "{bad}: {e}");
        }
        assert_eq!(
            resolve(root.path(), "near").unwrap(),
            root.path().canonicalize().unwrap().join("sub/inner")
        );
    }

    #[test]
    fn rejects_a_sandbox_that_does_not_exist() {
        let (root, _outside) = layout();
        let e = refused(root.path(), "sub/missing");
        assert!(
            e.contains("sandbox_dir 'sub/missing'") && e.contains("No such file"),
            "{e}"
        );
    }

    #[test]
    fn a_symlink_swapped_in_after_the_check_is_caught_by_the_next_check_only() {
        let (root, outside) = layout();
        let checked = resolve(root.path(), "sub/inner").unwrap();
        std::fs::remove_dir(root.path().join("sub/inner")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("sub/inner")).unwrap();
        // Not guaranteed: the path handed out before the swap now leads
        // outside, and a tool writing there follows the link.
        assert_eq!(
            checked.canonicalize().unwrap(),
            outside.path().canonicalize().unwrap()
        );
        // Guaranteed: the next request with the same sandbox_dir is checked
        // again and refused.
        let e = refused(root.path(), "sub/inner");
        assert!(e.contains("outside the worker's directory"), "{e}");
    }

    #[test]
    fn rejects_escapes() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("link")).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        for bad in ["/tmp", "../x", "sub/../../x", "link", "missing", "/"] {
            assert!(resolve(d.path(), bad).is_err(), "{bad} was accepted");
        }
    }
}
