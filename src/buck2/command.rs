//! Buck2's `ExecuteCommand` as a [`Request`]: no gRPC here, so the
//! conversion of untrusted bytes builds (and is fuzzed) without the C core.

use std::path::Path;

use crate::proto::worker::ExecuteCommand;
use crate::quote::quoted_bytes;
use crate::request::Request;

/// Argv and env arrive as bytes; the handler takes text. Anything that is not
/// UTF-8 is refused with exit code 2, naming the offending entry.
pub fn to_request(command: ExecuteCommand, cwd: &Path) -> Result<(Request, Option<u64>), String> {
    let args = command
        .argv
        .into_iter()
        .enumerate()
        .map(|(i, arg)| {
            String::from_utf8(arg).map_err(|e| {
                format!(
                    "worker: argument {i} ({:?}) is not valid UTF-8: {}\n",
                    quoted_bytes(e.as_bytes()),
                    e.utf8_error()
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let env = command
        .env
        .into_iter()
        .map(|entry| {
            let shown = quoted_bytes(&entry.key);
            let key = String::from_utf8(entry.key).map_err(|_| {
                format!("worker: environment variable name {shown:?} is not valid UTF-8\n")
            })?;
            let value = String::from_utf8(entry.value).map_err(|_| {
                format!("worker: value of environment variable {shown} is not valid UTF-8\n")
            })?;
            Ok((key, value))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut request = Request::new(args, cwd.to_path_buf());
    request.env = env;
    // Zero would time out before starting; Buck2 sends no value for "no timeout",
    // so a zero can only mean an action timeout that rounded down.
    Ok((request, command.timeout_s.filter(|&s| s > 0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::worker::execute_command::EnvironmentEntry;

    fn command(argv: &[&[u8]]) -> ExecuteCommand {
        let mut c = ExecuteCommand::new();
        c.argv = argv.iter().map(|a| a.to_vec()).collect();
        c
    }

    #[test]
    fn argv_and_env_become_the_request() {
        let mut c = command(&[b"--work-ms", b"5", b"out"]);
        let mut e = EnvironmentEntry::new();
        e.key = b"K".to_vec();
        e.value = b"v".to_vec();
        c.env.push(e);
        c.timeout_s = Some(3);
        let (request, timeout) = to_request(c, Path::new("/root")).unwrap();
        assert_eq!(request.args, ["--work-ms", "5", "out"]);
        assert_eq!(request.env, [("K".to_owned(), "v".to_owned())]);
        assert_eq!(request.workdir, Path::new("/root"));
        assert_eq!(timeout, Some(3));
    }

    #[test]
    fn invalid_utf8_names_the_argument() {
        let e = to_request(command(&[b"ok", b"bad\xff"]), Path::new(".")).unwrap_err();
        assert!(e.contains("argument 1"), "{e}");
    }

    #[test]
    fn invalid_utf8_in_env_names_the_variable() {
        let entry = |key: &[u8], value: &[u8]| {
            let mut e = EnvironmentEntry::new();
            e.key = key.to_vec();
            e.value = value.to_vec();
            e
        };
        let mut c = command(&[b"out"]);
        c.env.push(entry(b"K\xff", b"v"));
        let e = to_request(c, Path::new(".")).unwrap_err();
        assert!(e.contains("environment variable name"), "{e}");
        let mut c = command(&[b"out"]);
        c.env.push(entry(b"GOOD", b"\xc3"));
        let e = to_request(c, Path::new(".")).unwrap_err();
        assert!(e.contains("value of environment variable GOOD"), "{e}");
    }

    #[test]
    fn empty_argv_is_an_empty_request() {
        let (request, timeout) = to_request(ExecuteCommand::new(), Path::new(".")).unwrap();
        assert!(request.args.is_empty());
        assert_eq!(timeout, None);
    }
}
