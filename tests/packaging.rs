//! The Nix image (flake.nix, not buildable here) must stay the image that
//! ci/image.sh builds and ci/image-test.sh runs: same binary path, contents
//! and user. Both are read as text, since neither can be evaluated here.

use std::fs;
use std::path::Path;

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// The value of the first `NAME=VALUE` shell assignment.
fn shell_var(script: &str, name: &str) -> String {
    let prefix = format!("{name}=");
    script
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name}= in ci/image.sh"))
        .to_owned()
}

/// The quoted value of the first `NAME = "VALUE";` Nix binding.
fn nix_string(flake: &str, name: &str) -> String {
    let prefix = format!("{name} = \"");
    flake
        .lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no {name} = \"...\" in flake.nix"))
        .to_owned()
}

#[test]
fn flake_image_matches_ci_image() {
    let script = read("ci/image.sh");
    let flake = read("flake.nix");

    let (user, uid) = (shell_var(&script, "user"), shell_var(&script, "uid"));
    assert_eq!(nix_string(&flake, "user"), user);
    assert_eq!(nix_string(&flake, "uid"), uid);
    assert!(script.contains("--config.user \"$uid:$uid\""));
    assert!(flake.contains("User = \"${uid}:${uid}\";"));

    // passwd and group lines, in the same shape.
    assert!(script
        .contains("'%s:x:%s:%s:%s:/tmp:/sbin/nologin\\n' \"$user\" \"$uid\" \"$uid\" \"$user\""));
    assert!(flake.contains("\"${user}:x:${uid}:${uid}:${user}:/tmp:/sbin/nologin\\n\""));
    assert!(script.contains("'%s:x:%s:\\n' \"$user\" \"$uid\""));
    assert!(flake.contains("\"${user}:x:${uid}:\\n\""));

    let binary = "usr/local/bin/persistent-worker";
    assert!(script.contains(&format!("install -m 0755 \"$binary\" \"$root/{binary}\"")));
    assert!(flake.contains(&format!(
        "install -m 0755 ${{staticWorker}}/bin/persistent-worker {binary}"
    )));
    assert!(script.contains("install -d -m 1777 \"$root/tmp\""));
    assert!(flake.contains("install -d -m 1777 tmp"));

    assert!(script.contains("--config.env PATH=/usr/local/bin"));
    assert!(flake.contains("Env = [ \"PATH=/usr/local/bin\" ];"));
    assert!(script.contains("--config.workingdir /tmp"));
    assert!(flake.contains("WorkingDir = \"/tmp\";"));

    // Nothing else goes in: the script installs exactly these into the root.
    let installs: Vec<&str> = script.lines().filter(|l| l.contains("\"$root/")).collect();
    assert_eq!(installs.len(), 6, "{installs:#?}");
    assert_eq!(flake.matches("writeTextDir").count(), 2);
}

#[test]
fn envrc_loads_the_flake_then_private_settings() {
    for (path, flake) in [
        (".envrc", "use flake"),
        ("examples/buck2/.envrc", "use flake ../.."),
    ] {
        let lines: Vec<String> = read(path)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
        assert_eq!(
            lines[..2],
            [flake, "source_env_if_exists .envrc.private"],
            "{path}"
        );
        let rest: Vec<&str> = lines[2..].iter().map(String::as_str).collect();
        if path == ".envrc" {
            assert!(rest.is_empty(), "{path}: {rest:#?}");
        } else {
            // Buck2 refuses an unset variable in http_headers: the example
            // exports both registry variables, empty unless set privately.
            assert_eq!(
                rest,
                [
                    "export BUILDBUDDY_CONTAINER_USER=\"${BUILDBUDDY_CONTAINER_USER-}\"",
                    "export BUILDBUDDY_CONTAINER_PASSWORD=\"${BUILDBUDDY_CONTAINER_PASSWORD-}\"",
                ],
                "{path}"
            );
        }
    }
    for ignore in [".gitignore", "examples/buck2/.gitignore"] {
        let text = read(ignore);
        assert!(
            text.lines().any(|l| l.trim() == ".envrc.private"),
            "{ignore}"
        );
        assert!(text.lines().any(|l| l.trim() == ".direnv"), "{ignore}");
    }
}

/// The `http_headers` entries of a buckconfig, as Buck2 splits them.
fn http_headers(path: &str) -> Vec<String> {
    read(path)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("http_headers"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .flat_map(|v| v.split(','))
        .map(|h| h.split_whitespace().collect())
        .filter(|h: &String| !h.is_empty())
        .collect()
}

#[test]
fn remote_buckconfigs_pass_registry_credentials_from_the_environment() {
    let wanted = [
        "x-buildbuddy-platform.container-registry-username:$BUILDBUDDY_CONTAINER_USER",
        "x-buildbuddy-platform.container-registry-password:$BUILDBUDDY_CONTAINER_PASSWORD",
    ];
    for path in [
        "examples/buck2/.buckconfig.buildbuddy",
        "examples/buck2/.buckconfig.buildbuddy-persistent-workers",
    ] {
        let headers = http_headers(path);
        for header in wanted {
            assert!(headers.iter().any(|h| h == header), "{path}: {headers:#?}");
        }
    }
    // Local runs pull no image: credentials there would only leak.
    for path in [
        "examples/buck2/.buckconfig",
        "examples/buck2/.buckconfig.no-workers",
        "examples/buck2/.buckconfig.local-persistent-workers",
        "examples/buck2/.buckconfig.local-bridge",
    ] {
        let text = read(path);
        for name in ["BUILDBUDDY_CONTAINER", "container-registry"] {
            assert!(!text.contains(name), "{path} mentions {name}");
        }
    }
}
