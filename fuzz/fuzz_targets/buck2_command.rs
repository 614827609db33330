//! Buck2's `ExecuteCommand` from arbitrary bytes to a request: never a
//! panic; what converts carries argv and env unchanged, and a refusal names
//! the offending entry in a bounded message.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use persistent_worker::buck2::command::to_request;
use persistent_worker::proto::worker::ExecuteCommand;
use persistent_worker::quote::quoted_bytes;
use protobuf::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(command) = ExecuteCommand::parse_from_bytes(data) else {
        return;
    };
    let argv = command.argv.clone();
    let env = command.env.clone();
    let timeout = command.timeout_s;
    match to_request(command, Path::new("/w")) {
        Ok((request, timeout_s)) => {
            let args: Vec<&[u8]> = request.args.iter().map(|a| a.as_bytes()).collect();
            assert_eq!(args, argv);
            assert_eq!(request.env.len(), env.len());
            for ((k, v), e) in request.env.iter().zip(&env) {
                assert_eq!((k.as_bytes(), v.as_bytes()), (&e.key[..], &e.value[..]));
            }
            assert_eq!(timeout_s, timeout.filter(|&s| s > 0));
        }
        Err(message) => {
            // 200 bytes shown, each at most ~10 characters once escaped.
            assert!(message.len() < 4096, "{} byte message", message.len());
            // The first entry that is not UTF-8 is the one named: argv
            // first, then the environment in order.
            let bad = |bytes: &[u8]| std::str::from_utf8(bytes).is_err();
            if let Some(i) = argv.iter().position(|a| bad(a)) {
                let named = format!("argument {i} ({:?})", quoted_bytes(&argv[i]));
                assert!(
                    message.contains(&named),
                    "{message:?} does not name {named:?}"
                );
            } else {
                let entry = env
                    .iter()
                    .find(|e| bad(&e.key) || bad(&e.value))
                    .expect("a refusal names an entry that is not UTF-8");
                let shown = quoted_bytes(&entry.key);
                let named = if bad(&entry.key) {
                    format!("environment variable name {shown:?}")
                } else {
                    format!("value of environment variable {shown}")
                };
                assert!(
                    message.contains(&named),
                    "{message:?} does not name {named:?}"
                );
            }
        }
    }
});
