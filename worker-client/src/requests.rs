//! Request lists from the command line and from request files, and the
//! command run before each request (`--before-request`).

use std::path::Path;
use std::process::Command;

/// Whitespace-separated arguments; no quoting, so an argument with spaces
/// needs `--arg` or an argument file.
pub fn split(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_owned).collect()
}

/// One request per non-empty line; lines starting with `#` are comments.
pub fn read_file(path: &Path) -> Result<Vec<Vec<String>>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read requests file {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(split)
        .collect())
}

/// The `n`-th request to send: the list repeated, `{n}` replaced by `n`, so
/// that concurrent requests can name distinct output files.
pub fn nth(templates: &[Vec<String>], n: usize) -> Vec<String> {
    if templates.is_empty() {
        return Vec::new();
    }
    let number = n.to_string();
    templates[n % templates.len()]
        .iter()
        .map(|arg| arg.replace("{n}", &number))
        .collect()
}

/// Runs `--before-request`'s shell command for request `n` (`{n}` replaced)
/// and waits for it: it stands for whatever a user does between builds (an
/// edit), so it runs outside the request's timing and must succeed.
pub fn before(command: &str, n: usize) -> Result<(), String> {
    let command = command.replace("{n}", &n.to_string());
    match Command::new("sh").arg("-c").arg(&command).status() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!(
            "--before-request `{command}` for request {n} failed ({status})"
        )),
        Err(e) => Err(format!("cannot run --before-request `{command}`: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_cycle_and_number() {
        let templates = vec![
            vec!["a-{n}".to_owned()],
            vec!["b".to_owned(), "{n}{n}".to_owned()],
        ];
        assert_eq!(nth(&templates, 0), ["a-0"]);
        assert_eq!(nth(&templates, 1), ["b", "11"]);
        assert_eq!(nth(&templates, 2), ["a-2"]);
    }

    #[test]
    fn before_request_numbers_its_command_and_reports_failure() {
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("mark");
        let command = format!("echo {{n}} > '{}'", mark.display());
        before(&command, 7).unwrap();
        assert_eq!(std::fs::read_to_string(&mark).unwrap(), "7\n");
        let error = before("exit 3", 2).unwrap_err();
        assert!(error.contains("request 2 failed"), "{error}");
    }

    #[test]
    fn file_lines_skip_blanks_and_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reqs");
        std::fs::write(&path, "# c\n a  b \n\nc\n").unwrap();
        assert_eq!(
            read_file(&path).unwrap(),
            vec![vec!["a".to_owned(), "b".to_owned()], vec!["c".to_owned()]]
        );
    }
}
