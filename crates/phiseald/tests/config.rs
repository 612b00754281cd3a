//! The configuration as an operator meets it: the real `phiseald --check-config` on the
//! shipped example (`phiseald.example.toml`) and on broken files, asserting that every error
//! names the key and the problem.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The example shipped next to the crate's manifest.
fn example() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").unwrap()).join("phiseald.example.toml")
}

/// What one `phiseald` run did.
struct Run {
    code: i32,
    stderr: String,
}

impl Run {
    /// Asserts success with the "configuration ok" line.
    #[track_caller]
    fn ok(&self) {
        assert_eq!(
            (self.code, self.stderr.as_str()),
            (0, "phiseald: configuration ok\n"),
            "expected a valid configuration"
        );
    }

    /// Asserts failure (exit 1) with `message` after the common prefix.
    #[track_caller]
    fn fails_with(&self, message: &str) -> &Self {
        assert_eq!(self.code, 1, "exit code; stderr: {}", self.stderr);
        assert!(
            self.stderr.starts_with("phiseald: configuration: "),
            "{}",
            self.stderr
        );
        assert!(
            self.stderr.contains(message),
            "expected {message:?} in {:?}",
            self.stderr
        );
        self
    }
}

/// Runs `phiseald ARGS` with `env` as the only `PHISEALD_*` variables.
fn phiseald(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_phiseald"));
    cmd.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PHISEALD_") {
            cmd.env_remove(name);
        }
    }
    cmd.envs(env.iter().copied());
    let output = cmd.output().unwrap();
    Run {
        code: output
            .status
            .code()
            .expect("phiseald was killed by a signal"),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// `phiseald --check-config --config FILE`.
fn check_file(file: &Path, env: &[(&str, &str)]) -> Run {
    phiseald(
        &[
            "--check-config".as_ref(),
            "--config".as_ref(),
            file.as_os_str(),
        ],
        env,
    )
}

/// `phiseald --check-config --config <a file holding text>` (mode 0600: it may hold secrets).
fn check_text(text: &str, env: &[(&str, &str)]) -> Run {
    check_text_with_mode(text, 0o600, env)
}

/// [`check_text`] with the file's mode set to `mode`, in a private directory.
fn check_text_with_mode(text: &str, mode: u32, env: &[(&str, &str)]) -> Run {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("phiseald.toml");
    std::fs::write(&file, text).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
    check_file(&file, env)
}

/// The two required settings, without a profile (so production, the file default).
const SITE: &str = r#"
socket = "/run/phiseal/phiseald.sock"
data_dir = "/var/lib/phiseal"
"#;

/// The smallest valid file: the local KMS (the default `[kms]`) needs the development
/// profile, which a file must ask for.
const MINIMAL: &str = r#"
socket = "/run/phiseal/phiseald.sock"
profile = "development"
data_dir = "/var/lib/phiseal"
"#;

#[test]
fn the_example_is_valid() {
    check_file(&example(), &[]).ok();
}

#[test]
fn the_examples_commented_out_values_are_valid_too() {
    // `# key = value` lines are optional settings shown with an example value.
    let text = std::fs::read_to_string(example()).unwrap();
    let mut enabled = 0;
    let uncommented: String = text
        .lines()
        .map(|line| {
            let setting = line.strip_prefix("# ").filter(|rest| {
                rest.split_once(" = ").is_some_and(|(key, _)| {
                    let bare = key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
                    let quoted = key.len() > 2
                        && key.starts_with('"')
                        && key.ends_with('"')
                        && !key.contains(' ');
                    !key.is_empty() && (bare || quoted)
                })
            });
            match setting {
                Some(rest) => {
                    enabled += 1;
                    format!("{rest}\n")
                }
                None => format!("{line}\n"),
            }
        })
        .collect();
    assert!(enabled >= 5, "only {enabled} commented-out settings found");
    // `database_url` and `ca_file` belong to a PostgreSQL store with TLS.
    let postgres = [
        ("PHISEALD_KEY_STORE__KIND", "postgres"),
        ("PHISEALD_KEY_STORE__TLS", "require"),
    ];
    check_text(&uncommented, &postgres).ok();
}

/// The keys a table accepts, read from the daemon's own "unknown field" error.
fn accepted_keys(table: &str, entry: &str) -> Vec<String> {
    let text = format!("{MINIMAL}\n{table}\nnot_a_key = 1\n{entry}");
    let run = check_text(&text, &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let expected = run
        .stderr
        .split_once("expected ")
        .unwrap_or_else(|| panic!("{}", run.stderr))
        .1;
    expected
        .split('`')
        .filter(|word| {
            !word.is_empty()
                && word
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'*')
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_example_documents_every_key_and_its_environment_variable() {
    let text = std::fs::read_to_string(example()).unwrap();
    let top = accepted_keys("", "");
    assert!(top.len() >= 12, "{top:?}");
    for key in &top {
        match key.as_str() {
            // Arrays of tables: documented with their entries below.
            "tokens" | "policy" => {
                let var = format!("Env: PHISEALD_{}", key.to_uppercase());
                assert!(text.contains(&var), "{var} is not documented");
            }
            "audit" | "kms" | "key_store" | "cache" | "limits" | "metrics" | "log" | "rotation" => {
                assert!(text.contains(&format!("[{key}]")), "[{key}] missing");
                let subs = accepted_keys(&format!("[{key}]"), "");
                assert!(!subs.is_empty(), "[{key}] accepts no key?");
                for sub in subs {
                    let var = format!("PHISEALD_{}__{}", key.to_uppercase(), sub.to_uppercase());
                    assert!(text.contains(&var), "{var} is not documented");
                    assert!(
                        text.contains(&format!("\n{sub} = "))
                            || text.contains(&format!("\n# {sub} = "))
                            || text.contains(&format!("[{key}.{sub}]")),
                        "{key}.{sub} has no example line"
                    );
                }
            }
            other => {
                let var = format!("Env: PHISEALD_{}", other.to_uppercase());
                assert!(text.contains(&var), "{var} is not documented");
                assert!(
                    text.contains(&format!("\n{other} = "))
                        || text.contains(&format!("\n# {other} = ")),
                    "{other} has no example line"
                );
            }
        }
    }
    for backend in ["aws", "azure", "pkcs11"] {
        let subs = accepted_keys(&format!("[kms.{backend}]"), "");
        assert!(subs.len() >= 3, "[kms.{backend}]: {subs:?}");
        for sub in subs {
            let var = format!(
                "Env: PHISEALD_KMS__{}__{}",
                backend.to_uppercase(),
                sub.to_uppercase()
            );
            assert!(text.contains(&var), "{var} is not documented");
            assert!(
                text.contains(&format!("#   {sub} = ")),
                "kms.{backend}.{sub} has no example line"
            );
        }
    }
    let token_keys = accepted_keys("[[tokens]]", "name = \"x\"\nsha256 = \"y\"");
    assert_eq!(token_keys, ["name", "sha256"]);
    for key in token_keys {
        assert!(text.contains(&format!("#   {key} ")), "tokens.{key}");
    }
    let policy_keys = accepted_keys(
        "[[policy]]",
        "uids = [1]\noperations = [\"data\"]\ntenants = [\"*\"]",
    );
    assert_eq!(policy_keys.len(), 6, "{policy_keys:?}");
    for key in policy_keys {
        assert!(
            text.contains(&format!("#       {key} ")) || text.contains(&format!("`{key}`")),
            "policy.{key}"
        );
    }
}

#[test]
fn an_unknown_key_is_named() {
    let run = check_text(&format!("{MINIMAL}[limits]\nmax_batch_item = 10\n"), &[]);
    run.fails_with("limits.max_batch_item: unknown field: found `max_batch_item`, expected `one of `max_message_bytes`, `max_batch_items`");
    run.fails_with("(from TOML file)");
    // At the top level too, and from the environment (every PHISEALD_* variable is a key).
    check_text(&format!("{MINIMAL}sockets = \"/x\"\n"), &[])
        .fails_with("sockets: unknown field: found `sockets`");
    check_text(MINIMAL, &[("PHISEALD_LIMITS__BATCH", "5")])
        .fails_with("limits.batch: unknown field: found `batch`");
}

#[test]
fn a_wrong_type_from_the_environment_is_named() {
    let run = check_text(MINIMAL, &[("PHISEALD_LIMITS__MAX_BATCH_ITEMS", "abc")]);
    run.fails_with(
        "limits.max_batch_items: invalid type: found string \"abc\", expected usize (from `PHISEALD_` environment variable(s))",
    );
    check_text(MINIMAL, &[("PHISEALD_LIMITS__REQUEST_TIMEOUT", "5")]).fails_with(
        "limits.request_timeout: invalid type: found unsigned int `5`, expected a duration",
    );
    check_text(MINIMAL, &[("PHISEALD_PROFILE", "prod")]).fails_with(
        "profile: unknown variant: found `prod`, expected ``development` or `production``",
    );
    // A valid override is taken.
    check_text(MINIMAL, &[("PHISEALD_LIMITS__MAX_BATCH_ITEMS", "5000")]).ok();
}

#[test]
fn out_of_range_values_are_named() {
    check_text(&format!("{MINIMAL}[limits]\nmax_batch_items = 0\n"), &[])
        .fails_with("limits.max_batch_items: must be between 1 and 1000000");
    for per_uid in ["0", "1025"] {
        check_text(
            MINIMAL,
            &[("PHISEALD_LIMITS__MAX_REQUESTS_IN_FLIGHT_PER_UID", per_uid)],
        )
        .fails_with(
            "limits.max_requests_in_flight_per_uid: must be between 1 and \
             limits.max_requests_in_flight",
        );
    }
    check_text(
        MINIMAL,
        &[("PHISEALD_LIMITS__MAX_REQUESTS_IN_FLIGHT_PER_UID", "1024")],
    )
    .ok();
    check_text(MINIMAL, &[("PHISEALD_LIMITS__MAX_MESSAGE_BYTES", "100")])
        .fails_with("limits.max_message_bytes: must be between 1024 and 268435456");
    for size in ["1", "65535", "1099511627777"] {
        check_text(MINIMAL, &[("PHISEALD_AUDIT__ROLLOVER_BYTES", size)]).fails_with(
            "audit.rollover_bytes: must be 0 (never) or between 65536 and 1099511627776",
        );
    }
    for size in ["0", "65536"] {
        check_text(MINIMAL, &[("PHISEALD_AUDIT__ROLLOVER_BYTES", size)]).ok();
    }
    for size in ["4095", "16777217"] {
        check_text(
            MINIMAL,
            &[("PHISEALD_LIMITS__MAX_STREAM_SEGMENT_BYTES", size)],
        )
        .fails_with("limits.max_stream_segment_bytes: must be between 4096 and 16777216");
    }
    check_text(
        &format!("{MINIMAL}[limits]\nmax_stream_segment_bytes = 16777216\n"),
        &[],
    )
    .ok();
    check_text(
        &format!("{MINIMAL}[limits]\nrequest_timeout = \"5ms\"\n"),
        &[],
    )
    .fails_with("limits.request_timeout: must be between 10ms and 1h");
    // The keyring's bound on max_uses, checked by --check-config too.
    check_text(&format!("{MINIMAL}[cache]\nmax_uses = 2147483649\n"), &[])
        .fails_with("cache.max_uses: must be between 1 and 2147483648");
    check_text(&format!("{MINIMAL}[cache]\nmax_uses = 2147483648\n"), &[]).ok();
    check_text(&format!("{MINIMAL}[cache]\ncapacity = 0\n"), &[])
        .fails_with("cache.capacity: must be at least 1");
    // Far too long (once accepted: every call's deadline then overflowed and panicked).
    for long in ["2h", "10000000000000000000s"] {
        check_text(
            &format!("{MINIMAL}[limits]\nrequest_timeout = \"{long}\"\n"),
            &[],
        )
        .fails_with("limits.request_timeout: must be between 10ms and 1h");
    }
    check_text(
        &format!("{MINIMAL}[limits]\nrequest_timeout = \"1h\"\n"),
        &[],
    )
    .ok();
    check_text(&format!("{MINIMAL}[audit]\nsync_interval = \"11s\"\n"), &[])
        .fails_with("audit.sync_interval: must be between 1ms and 10s");
    check_text(
        &format!("{MINIMAL}[audit]\nsync_interval = \"500us\"\n"),
        &[],
    )
    .fails_with("audit.sync_interval: must be between 1ms and 10s");
    check_text(&format!("{MINIMAL}[rotation]\nperiod = \"500ms\"\n"), &[])
        .fails_with("rotation.period / rotation.tenants: must be at least 1s");
    check_text(
        &format!("{MINIMAL}[rotation.tenants]\n\"a b\" = \"30d\"\n"),
        &[],
    )
    .fails_with("rotation.tenants.\"a b\": is not a valid tenant id");
}

#[test]
fn a_policy_rule_without_subject_is_refused() {
    let text = format!(
        "{MINIMAL}
[[policy]]
operations = [\"encrypt\"]
tenants = [\"*\"]
"
    );
    check_text(&text, &[]).fails_with(
        "policy[0].uids/gids/tokens: a rule must name its subject (at least one uid, gid or token)",
    );
}

#[test]
fn a_policy_naming_an_undefined_token_is_refused() {
    let text = format!(
        "{MINIMAL}
[[tokens]]
name = \"ops\"
sha256 = \"{}\"

[[policy]]
tokens = [\"ops\"]
operations = [\"admin\"]
tenants = [\"*\"]

[[policy]]
tokens = [\"billing\"]
operations = [\"encrypt\"]
tenants = [\"*\"]
",
        "ab".repeat(32)
    );
    check_text(&text, &[])
        .fails_with("policy[1].tokens: token 'billing' is not defined in [[tokens]]");
}

#[test]
fn a_bad_token_hash_is_refused() {
    for bad in [
        "AB".repeat(32),
        "ab".repeat(31),
        format!("{}zz", "ab".repeat(31)),
    ] {
        let text = format!("{MINIMAL}\n[[tokens]]\nname = \"ops\"\nsha256 = \"{bad}\"\n");
        check_text(&text, &[]).fails_with(
            "tokens[0].sha256: must be 64 lower-case hex digits (the SHA-256 of the token; `phiseal token new` prints it)",
        );
    }
    let twice = format!(
        "{MINIMAL}\n[[tokens]]\nname = \"ops\"\nsha256 = \"{0}\"\n[[tokens]]\nname = \"ops\"\nsha256 = \"{0}\"\n",
        "cd".repeat(32)
    );
    check_text(&twice, &[]).fails_with("tokens[1].name: is defined twice");
}

#[test]
fn one_token_hash_for_two_names_is_refused() {
    let text = format!(
        "{MINIMAL}\n[[tokens]]\nname = \"a\"\nsha256 = \"{0}\"\n[[tokens]]\nname = \"b\"\nsha256 = \"{0}\"\n",
        "cd".repeat(32)
    );
    check_text(&text, &[]).fails_with("tokens[1].sha256: is another token's hash too");
}

#[test]
fn policy_patterns_that_match_nothing_or_too_much_are_refused() {
    let rule = |tenants: &str, fields: &str, operations: &str| {
        format!(
            "{MINIMAL}\n[[policy]]\nuids = [1000]\noperations = [{operations}]\ntenants = [{tenants}]\nfields = [{fields}]\n"
        )
    };
    for (tenants, fields) in [("\" bad tenant \"", "\"*\""), ("\"clinic-*\"", "\"\"")] {
        check_text(&rule(tenants, fields, "\"encrypt\""), &[])
            .fails_with("can match no tenant or field id");
    }
    // `fields` does not limit admin operations: such a rule must not look as if it did.
    for operations in ["\"*\"", "\"admin\"", "\"encrypt\", \"shred\""] {
        check_text(&rule("\"clinic-1\"", "\"ssn\"", operations), &[])
            .fails_with("policy[0].fields: limits data operations only");
    }
    check_text(&rule("\"clinic-*\"", "\"ssn\", \"mrn*\"", "\"data\""), &[]).ok();
}

#[test]
fn access_control_from_the_environment_is_refused_in_production() {
    let policy = "[{uids=[0],operations=[\"*\"],tenants=[\"*\"]}]";
    let text = format!(
        "profile = \"production\"\n{SITE}\n[kms]\nkind = \"aws\"\n[kms.aws]\nkey_id = \"alias/phiseal\"\nregion = \"us-east-1\"\n"
    );
    check_text(&text, &[]).ok();
    check_text(&text, &[("PHISEALD_POLICY", policy)]).fails_with(
        "production takes access control only from the config file: unset PHISEALD_POLICY",
    );
    // Also under a name the environment provider trims or folds (it still reads them).
    for name in ["PHISEALD_POLICY ", " phiseald_policy", "PHISEALD_Policy"] {
        check_text(&text, &[(name, policy)]).fails_with(
            "production takes access control only from the config file: unset PHISEALD_POLICY",
        );
    }
    // In development it is allowed (and logged as a warning at start).
    check_text(MINIMAL, &[("PHISEALD_POLICY", policy)]).ok();
    // The environment cannot lower the file's production profile to get there (or to the
    // local KMS) …
    check_text(
        &text,
        &[
            ("PHISEALD_PROFILE", "development"),
            ("PHISEALD_POLICY", policy),
        ],
    )
    .fails_with(
        "profile: the config file says \"production\" (or names no profile: production is the \
         default); the environment (PHISEALD_PROFILE) may not lower it",
    );
    // … but may raise a file's development profile (and keeping it is no change).
    check_text(&text, &[("PHISEALD_PROFILE", "production")]).ok();
    check_text(
        &format!(
            "{MINIMAL}[kms]\nkind = \"aws\"\n[kms.aws]\nkey_id = \"k\"\nregion = \"us-east-1\"\n"
        ),
        &[("PHISEALD_PROFILE", "production")],
    )
    .ok();
    check_text(MINIMAL, &[("PHISEALD_PROFILE", "production")])
        .fails_with("profile: production refuses the local development KMS");
}

#[test]
fn a_config_file_is_production_unless_it_says_development() {
    // No profile named: the production locks hold …
    check_text(SITE, &[]).fails_with(
        "profile: production refuses the local development KMS (a config file is production \
         unless it says profile = \"development\")",
    );
    let aws = format!(
        "{SITE}[kms]\nkind = \"aws\"\n[kms.aws]\nkey_id = \"alias/phiseal\"\nregion = \"us-east-1\"\n"
    );
    check_text(&aws, &[]).ok();
    check_text(&aws, &[("PHISEALD_TOKENS", "[]")]).fails_with(
        "production takes access control only from the config file: unset PHISEALD_TOKENS",
    );
    // … and the environment cannot lower them …
    check_text(SITE, &[("PHISEALD_PROFILE", "development")]).fails_with(
        "profile: the config file says \"production\" (or names no profile: production is the \
         default); the environment (PHISEALD_PROFILE) may not lower it",
    );
    // … only the file can.
    check_text(MINIMAL, &[]).ok();
    check_text(MINIMAL, &[("PHISEALD_TOKENS", "[]")]).ok();
}

#[test]
fn a_relative_socket_path_is_refused() {
    check_text(
        "socket = \"run/phiseald.sock\"\ndata_dir = \"/var/lib/phiseal\"\n",
        &[],
    )
    .fails_with("socket: must be an absolute path");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = phiseald(
        &[
            "--check-config".as_ref(),
            "--socket".as_ref(),
            "phiseald.sock".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
        ],
        &[],
    );
    run.fails_with("socket: must be an absolute path");
}

#[test]
fn a_start_refused_for_its_socket_directory_creates_nothing_in_the_data_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let data = dir.path().join("data");
    let run = phiseald(
        &[
            "--socket".as_ref(),
            run_dir.join("phiseald.sock").as_os_str(),
            "--data-dir".as_ref(),
            data.as_os_str(),
        ],
        &[],
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("could replace the socket"),
        "{}",
        run.stderr
    );
    let created: Vec<_> = std::fs::read_dir(&data)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(created.is_empty(), "created {created:?}");
}

#[test]
fn data_dir_without_config_uses_the_embedded_default() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let socket = dir.path().join("run/phiseald.sock");
    phiseald(
        &[
            "--check-config".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
        ],
        &[],
    )
    .ok();
    phiseald(
        &[
            "--check-config".as_ref(),
            "--socket".as_ref(),
            socket.as_os_str(),
            "--data-dir".as_ref(),
            data.as_os_str(),
        ],
        &[("PHISEALD_LIMITS__MAX_BATCH_ITEMS", "500")],
    )
    .ok();
    // Checking creates nothing.
    assert!(!data.exists() && !socket.exists());
    // The environment applies to the embedded default too.
    phiseald(
        &[
            "--check-config".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
        ],
        &[("PHISEALD_LIMITS__MAX_BATCH_ITEMS", "abc")],
    )
    .fails_with("limits.max_batch_items: invalid type: found string \"abc\", expected usize");
    phiseald(
        &[
            "--check-config".as_ref(),
            "--data-dir".as_ref(),
            "data".as_ref(),
        ],
        &[],
    )
    .fails_with("data_dir: must be an absolute path");
    phiseald(&["--check-config".as_ref()], &[])
        .fails_with("give --config FILE, or --data-dir DIR for the embedded default");
}

#[test]
fn a_missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    check_file(&missing, &[]).fails_with(&format!(
        "config file {}: not found or not a regular file",
        missing.display()
    ));
    // A file must name the socket and the data directory itself.
    check_text("data_dir = \"/var/lib/phiseal\"\n", &[]).fails_with("missing field `socket`");
}

#[test]
fn what_only_start_used_to_catch_is_checked_too() {
    check_text(&format!("{MINIMAL}[log]\nlevel = \"info,[\"\n"), &[])
        .fails_with("log.level: not a valid filter");
    check_text(
        &format!("socket_group = \"no-such-group-here\"\n{MINIMAL}"),
        &[],
    )
    .fails_with("socket_group: group 'no-such-group-here' not found in /etc/group");
    check_text(&format!("profile = \"production\"\n{SITE}"), &[])
        .fails_with("profile: production refuses the local development KMS");
    check_text(&format!("{MINIMAL}[cache]\nkey_ttl = \"0s\"\n"), &[])
        .fails_with("cache.key_ttl: must be more than 0");
    check_text(
        &format!("{MINIMAL}[cache]\nkey_ttl = \"1s\"\nmetadata_ttl = \"2s\"\n"),
        &[],
    )
    .fails_with("cache.metadata_ttl: must not exceed cache.key_ttl");
}

#[test]
fn a_numeric_socket_group_works_from_file_and_environment() {
    check_text(&format!("socket_group = 0\n{MINIMAL}"), &[]).ok();
    check_text(MINIMAL, &[("PHISEALD_SOCKET_GROUP", "0")]).ok();
    check_text(MINIMAL, &[("PHISEALD_SOCKET_GROUP", "nogroup")]).ok();
}

#[test]
fn the_command_line_wins_and_may_stand_in_for_the_file() {
    // A file without socket and data_dir is complete with --socket and --data-dir.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("phiseald.toml");
    std::fs::write(
        &file,
        "profile = \"development\"\n[limits]\nmax_batch_items = 5\n",
    )
    .unwrap();
    let socket = dir.path().join("run/d.sock");
    let data = dir.path().join("data");
    let args = |with_socket: bool| {
        let mut a: Vec<&std::ffi::OsStr> = vec!["--check-config".as_ref(), "--config".as_ref()];
        a.push(file.as_os_str());
        if with_socket {
            a.push("--socket".as_ref());
            a.push(socket.as_os_str());
        }
        a.push("--data-dir".as_ref());
        a.push(data.as_os_str());
        a
    };
    phiseald(&args(true), &[]).ok();
    phiseald(&args(false), &[]).fails_with("missing field `socket`");
    // The command line beats the environment.
    phiseald(&args(true), &[("PHISEALD_SOCKET", "relative.sock")]).ok();
}

#[test]
fn key_store_settings_are_checked() {
    check_text(&format!("{MINIMAL}[key_store]\nkind = \"postgres\"\n"), &[])
        .fails_with("key_store.database_url: required with kind = \"postgres\"");
    check_text(
        &format!("{MINIMAL}[key_store]\nkind = \"postgres\"\n"),
        &[(
            "PHISEALD_KEY_STORE__DATABASE_URL",
            "postgresql://app:secret-pw@db:5432/keys",
        )],
    )
    .ok();
    let run = check_text(
        &format!("{MINIMAL}[key_store]\ndatabase_url = \"postgresql://app:secret-pw@db/keys\"\n"),
        &[],
    );
    run.fails_with("key_store.database_url: only used with kind = \"postgres\"");
    assert!(!run.stderr.contains("secret-pw"), "{}", run.stderr);
    check_text(
        &format!("{MINIMAL}[key_store]\ntls = \"disable\"\nca_file = \"/etc/ca.pem\"\n"),
        &[],
    )
    .fails_with("key_store.ca_file: only used with tls = \"require\"");
    for timeout in ["0s", "10m"] {
        check_text(
            &format!("{MINIMAL}[key_store]\nconnect_timeout = \"{timeout}\"\n"),
            &[],
        )
        .fails_with("key_store.connect_timeout: must be between 100ms and 30s");
    }
    check_text(
        &format!("{MINIMAL}[key_store]\nconnect_timeout = \"30s\"\n"),
        &[],
    )
    .ok();
}

#[test]
fn production_refuses_a_plaintext_key_store_connection_off_this_host() {
    use std::os::unix::fs::PermissionsExt;
    let production = "profile = \"production\"\n";
    let aws =
        "[kms]\nkind = \"aws\"\n[kms.aws]\nkey_id = \"alias/phiseal\"\nregion = \"us-east-1\"\n";
    let config =
        |store: &str| format!("{production}{SITE}{aws}[key_store]\nkind = \"postgres\"\n{store}");
    fn url(u: &str) -> [(&'static str, &str); 1] {
        [("PHISEALD_KEY_STORE__DATABASE_URL", u)]
    }
    let refused =
        "key_store.tls: production refuses tls = \"disable\" to a database on another host";
    check_text(
        &config(""),
        &url("postgresql://app:secret-pw@db.internal/keys"),
    )
    .fails_with(refused);
    check_text(
        &config("tls = \"disable\"\n"),
        &url("host=localhost hostaddr=10.0.0.7 user=app"),
    )
    .fails_with(refused);
    // On this host (Unix socket, localhost, loopback), with TLS, or explicitly allowed.
    for local in [
        "postgresql://app@localhost/keys",
        "postgresql://app@127.0.0.1:5433/keys",
        "host=/var/run/postgresql user=app dbname=keys",
    ] {
        check_text(&config(""), &url(local)).ok();
    }
    // Not through a socket directory every user can write (another user's socket could
    // answer while PostgreSQL is down).
    check_text(&config(""), &url("host=/tmp user=app dbname=keys"))
        .fails_with("key_store.database_url: production refuses the socket directory /tmp:");
    // Nor one that anyone could still create there, nor a symlink there to a good one.
    let missing = format!("/tmp/phiseal-no-such-dir-{}", std::process::id());
    check_text(&config(""), &url(&format!("host={missing} user=app"))).fails_with(&format!(
        "production refuses the socket directory {missing}:"
    ));
    let link = format!("/tmp/phiseal-pg-link-{}", std::process::id());
    std::os::unix::fs::symlink("/var/run", &link).unwrap();
    let run = check_text(&config(""), &url(&format!("host={link} user=app")));
    std::fs::remove_file(&link).unwrap();
    run.fails_with(&format!("production refuses the socket directory {link}:"));
    // A directory someone created there first (its mode is theirs to choose), with or
    // without a trailing slash.
    let made = format!("/tmp/phiseal-pg-made-{}", std::process::id());
    std::fs::create_dir(&made).unwrap();
    std::fs::set_permissions(&made, std::fs::Permissions::from_mode(0o755)).unwrap();
    for spelled in [made.clone(), format!("{made}/")] {
        check_text(&config(""), &url(&format!("host={spelled} user=app"))).fails_with(&format!(
            "production refuses the socket directory {spelled}"
        ));
    }
    std::fs::remove_dir(&made).unwrap();
    check_text(
        &config("tls = \"require\"\n"),
        &url("postgresql://app@db.internal/keys"),
    )
    .ok();
    check_text(
        &config("allow_plaintext_network = true\n"),
        &url("postgresql://app@db.internal/keys"),
    )
    .ok();
    // Development keeps the old default.
    check_text(
        &format!("{MINIMAL}[key_store]\nkind = \"postgres\"\n"),
        &url("postgresql://app@db.internal/keys"),
    )
    .ok();
    // The opt-in only where it means something.
    check_text(
        &config("tls = \"require\"\nallow_plaintext_network = true\n"),
        &url("postgresql://app@db.internal/keys"),
    )
    .fails_with("key_store.allow_plaintext_network: only used with kind = \"postgres\" and tls = \"disable\"");
    // A URL that cannot be judged is named, not quoted.
    let run = check_text(
        &config(""),
        &url("postgresql://app:secret-pw@db:notaport/keys"),
    );
    run.fails_with("key_store.database_url:");
    assert!(!run.stderr.contains("secret-pw"), "{}", run.stderr);
}

#[test]
fn a_pkcs11_module_or_ca_file_others_could_replace_is_refused() {
    // The daemon runs the module's code with every tenant key and the PIN, and the CA file
    // decides which database server it trusts: like the config file, they must not be
    // replaceable by another user (before: not checked at all).
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let module = shared.join("libvendor.so");
    let ca = shared.join("ca.pem");
    std::fs::write(&module, b"not really a library").unwrap();
    std::fs::write(&ca, b"-----").unwrap();
    let pkcs11 = |module: &std::path::Path| {
        format!(
            "{MINIMAL}[kms]\nkind = \"pkcs11\"\n[kms.pkcs11]\nmodule = \"{}\"\n\
             token_label = \"t\"\nkey_label = \"k\"\n",
            module.display()
        )
    };
    let with_ca = |ca: &std::path::Path| {
        format!(
            "{MINIMAL}[key_store]\nkind = \"postgres\"\ntls = \"require\"\nca_file = \"{}\"\n",
            ca.display()
        )
    };
    let url = [(
        "PHISEALD_KEY_STORE__DATABASE_URL",
        "postgres://phiseal@db.internal/keys",
    )];
    let pin = [("PHISEALD_KMS__PKCS11__PIN", "1234")];
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    check_text(&pkcs11(&module), &pin).ok();
    check_text(&with_ca(&ca), &url).ok();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    check_text(&pkcs11(&module), &pin)
        .fails_with("kms.pkcs11.module")
        .fails_with("is writable by group or others (mode 0777)");
    check_text(&with_ca(&ca), &url).fails_with("key_store.ca_file");
    // Unless the configuration trusts them (a platform's group-writable volume).
    check_text(&format!("{}check_module = false\n", pkcs11(&module)), &pin).ok();
    check_text(&format!("{}check_ca_file = false\n", with_ca(&ca)), &url).ok();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o666)).unwrap();
    check_text(&pkcs11(&module), &pin).fails_with("it is writable by group or others");
}

#[test]
fn log_levels_that_would_hide_or_raise_everything_and_relative_trusted_paths_are_refused() {
    check_text(MINIMAL, &[("PHISEALD_LOG__LEVEL", " , ")])
        .fails_with("log.level: must not be empty");
    check_text(MINIMAL, &[("PHISEALD_LOG__LEVEL", "[request]=trace")])
        .fails_with("log.level: span directives");
    // (A number is a level too: kept for phiseal's crates only, see LogConfig::filter.)
    check_text(&format!("{MINIMAL}[log]\nlevel = \"4\"\n"), &[]).ok();
    check_text(
        &format!(
            "{MINIMAL}[kms]\nkind = \"pkcs11\"\n[kms.pkcs11]\nmodule = \"libvendor.so\"\n\
             token_label = \"t\"\nkey_label = \"k\"\n"
        ),
        &[("PHISEALD_KMS__PKCS11__PIN", "1234")],
    )
    .fails_with("kms.pkcs11.module: must be an absolute path");
    check_text(
        &format!(
            "{MINIMAL}[key_store]\nkind = \"postgres\"\ntls = \"require\"\nca_file = \"ca.pem\"\n"
        ),
        &[(
            "PHISEALD_KEY_STORE__DATABASE_URL",
            "postgres://phiseal@db.internal/keys",
        )],
    )
    .fails_with("key_store.ca_file: must be an absolute path");
}

#[test]
fn a_secret_of_the_wrong_type_is_named_but_never_echoed() {
    // An unquoted PIN is a TOML integer: figment's own message would print it.
    let pkcs11 = "[kms]\nkind = \"pkcs11\"\n[kms.pkcs11]\n\
                  module = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"t\"\n\
                  key_label = \"k\"\n";
    for (text, key, value) in [
        (
            format!("{MINIMAL}{pkcs11}pin = 736251\n"),
            "kms.pkcs11.pin",
            "736251",
        ),
        (
            format!("{MINIMAL}{pkcs11}pin = [\"s3cr3t-pin\"]\n"),
            "kms.pkcs11.pin",
            "s3cr3t-pin",
        ),
        (
            format!("{MINIMAL}[key_store]\nkind = \"postgres\"\ndatabase_url = 99887766\n"),
            "key_store.database_url",
            "99887766",
        ),
    ] {
        let run = check_text(&text, &[]);
        run.fails_with(&format!(
            "{key}: invalid value (not shown: this key holds a secret)"
        ));
        assert!(
            !run.stderr.contains(value),
            "{value} echoed: {}",
            run.stderr
        );
    }
    // A syntax error names the line and the cause, never the line's text.
    for (text, secret) in [
        (
            format!("{MINIMAL}{pkcs11}pin = \"se\\qcret-1234\"\n"),
            "qcret-1234",
        ),
        (
            format!("{MINIMAL}{pkcs11}pin = \"first-0917\"\npin = \"second-0917\"\n"),
            "0917",
        ),
    ] {
        let run = check_text(&text, &[]);
        run.fails_with("TOML parse error at line");
        assert!(
            !run.stderr.contains(secret),
            "{secret} echoed: {}",
            run.stderr
        );
    }
    // Other keys keep figment's full message.
    check_text(
        &format!("{MINIMAL}[limits]\nmax_batch_items = \"many\"\n"),
        &[],
    )
    .fails_with("limits.max_batch_items: invalid type: found string \"many\"");
}

#[test]
fn the_kms_section_names_what_is_missing_or_misplaced() {
    check_text(&format!("{MINIMAL}[kms]\nkind = \"aws\"\n"), &[])
        .fails_with("kms.aws: required with kms.kind = \"aws\"");
    check_text(
        &format!("{MINIMAL}[kms.aws]\nkey_id = \"alias/x\"\nregion = \"eu-west-1\"\n"),
        &[],
    )
    .fails_with("kms.aws: set, but kms.kind is \"local\"");
    check_text(
        &format!("{MINIMAL}[kms]\nkind = \"aws\"\n[kms.aws]\nkey_id = \" \"\nregion = \"x\"\n"),
        &[],
    )
    .fails_with("kms.aws.key_id: must not be empty");
    check_text(&format!("{MINIMAL}[kms]\nkind = \"vault\"\n"), &[])
        .fails_with("kms.kind: unknown variant: found `vault`");
    // The PIN may come from the environment only.
    check_text(
        &format!(
            "profile = \"production\"\n{SITE}[kms]\nkind = \"pkcs11\"\n[kms.pkcs11]\n\
             module = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"t\"\nkey_label = \"k\"\n"
        ),
        &[("PHISEALD_KMS__PKCS11__PIN", "0123")],
    )
    .ok();
    // Also under a lower-case name; and a PIN for a config without PKCS#11 is not applied to
    // it (one environment may serve the two configs of `phiseal root migrate`).
    check_text(
        &format!(
            "{MINIMAL}[kms]\nkind = \"pkcs11\"\n[kms.pkcs11]\n\
             module = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"t\"\nkey_label = \"k\"\n"
        ),
        &[("phiseald_kms__pkcs11__pin", "[0123")],
    )
    .ok();
    check_text(MINIMAL, &[("PHISEALD_KMS__PKCS11__PIN", "0123")]).ok();
    check_text(
        &format!(
            "profile = \"production\"\n{SITE}[kms]\nkind = \"aws\"\n[kms.aws]\n\
             key_id = \"alias/phiseal\"\nregion = \"eu-central-1\"\n[kms.previous]\nkind = \"local\"\n"
        ),
        &[],
    )
    .fails_with("profile: production refuses the local development KMS, also as kms.previous");
    // Production accepts a non-local KMS.
    check_text(
        &format!(
            "profile = \"production\"\n{SITE}[kms]\nkind = \"aws\"\n[kms.aws]\n\
             key_id = \"alias/phiseal\"\nregion = \"eu-central-1\"\n"
        ),
        &[],
    )
    .ok();
}

#[test]
fn a_variable_that_is_not_utf8_anywhere_in_the_environment_is_no_panic() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("phiseald.toml");
    std::fs::write(&file, MINIMAL).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_phiseald"))
        .arg("--check-config")
        .arg("--config")
        .arg(&file)
        .env(
            "SOME_OTHER_TOOLS_SETTING",
            std::ffi::OsStr::from_bytes(b"caf\xe9"),
        )
        .env(
            std::ffi::OsStr::from_bytes(b"LEGACY_\xff"),
            std::ffi::OsStr::from_bytes(b"x"),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("configuration ok"), "{stderr}");
}

#[test]
fn the_key_store_schema_is_checked_and_only_for_postgres() {
    let url = [(
        "PHISEALD_KEY_STORE__DATABASE_URL",
        "postgresql://app@localhost/keys",
    )];
    let postgres = |schema: &str| {
        format!("{MINIMAL}[key_store]\nkind = \"postgres\"\nschema = \"{schema}\"\n")
    };
    check_text(&postgres("phiseal_prod"), &url).ok();
    check_text(&postgres("Phiseal"), &url)
        .fails_with("key_store.schema: schema \"Phiseal\" is not 1 to 48 characters of a-z");
    check_text(&postgres("x; DROP TABLE y"), &url).fails_with("key_store.schema: schema");
    check_text(&postgres("pg_keys"), &url)
        .fails_with("key_store.schema: schema \"pg_keys\" is reserved");
    check_text(&format!("{MINIMAL}[key_store]\nschema = \"keys\"\n"), &[])
        .fails_with("key_store.schema: only used with kind = \"postgres\"");
    check_text(&postgres("information_schema"), &url)
        .fails_with("key_store.schema: schema \"information_schema\" is reserved");
    check_text(&postgres(&"s".repeat(48)), &url).ok();
    check_text(&postgres(&"s".repeat(49)), &url).fails_with("key_store.schema: schema \"sssssssss");
    // From the environment too.
    let minimal_postgres = format!("{MINIMAL}[key_store]\nkind = \"postgres\"\n");
    check_text(
        &minimal_postgres,
        &[url[0], ("PHISEALD_KEY_STORE__SCHEMA", "Bad-Name")],
    )
    .fails_with("key_store.schema: schema \"Bad-Name\" is not");
    check_text(
        &format!("{minimal_postgres}schema_owner = \"phiseal_admin\"\n"),
        &url,
    )
    .ok();
    check_text(
        &format!("{MINIMAL}[key_store]\nschema_owner = \"phiseal_admin\"\n"),
        &[],
    )
    .fails_with("key_store.schema_owner: only used with kind = \"postgres\"");
    check_text(&format!("{minimal_postgres}schema_owner = \"\"\n"), &url)
        .fails_with("key_store.schema_owner: must be a role name");
}

#[test]
fn production_refuses_the_azure_developer_credentials() {
    let azure = |credential: &str| {
        format!(
            "[kms]\nkind = \"azure\"\n[kms.azure]\nvault_url = \"https://v.vault.azure.net\"\n\
             key_name = \"k\"\ncredential = \"{credential}\"\n"
        )
    };
    for credential in ["azure-cli", "developer-tools"] {
        check_text(
            &format!("profile = \"production\"\n{SITE}{}", azure(credential)),
            &[],
        )
        .fails_with("kms.azure.credential: production refuses the developer credentials");
        // Development keeps them.
        check_text(&format!("{MINIMAL}{}", azure(credential)), &[]).ok();
    }
    check_text(
        &format!(
            "profile = \"production\"\n{SITE}{}",
            azure("managed-identity")
        ),
        &[],
    )
    .ok();
}

#[test]
fn a_config_file_others_could_change_or_read_secrets_from_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    // Writable by group or others: anyone could grant themselves access.
    for mode in [0o664, 0o646, 0o666] {
        check_text_with_mode(MINIMAL, mode, &[])
            .fails_with("is writable by group or others")
            .fails_with("chmod go-w");
    }
    check_text_with_mode(MINIMAL, 0o644, &[]).ok();
    // A secret in the file: only if no one else can read it.
    let pkcs11 = "[kms]\nkind = \"pkcs11\"\n[kms.pkcs11]\n\
                  module = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"t\"\n\
                  key_label = \"k\"\npin = \"pin-7362\"\n";
    let with_pin = format!("{MINIMAL}{pkcs11}");
    // (Also by the daemon's own group: in the documented unit that is the clients' group.)
    for mode in [0o644, 0o640, 0o604] {
        let run = check_text_with_mode(&with_pin, mode, &[]);
        run.fails_with("holds kms.pkcs11.pin and is readable by group or others")
            .fails_with("PHISEALD_KMS__PKCS11__PIN");
        assert!(!run.stderr.contains("pin-7362"), "{}", run.stderr);
    }
    check_text_with_mode(&with_pin, 0o600, &[]).ok();
    // A database URL is a secret only with a password in it.
    let url = |url: &str| {
        format!("{MINIMAL}[key_store]\nkind = \"postgres\"\ndatabase_url = \"{url}\"\n")
    };
    check_text_with_mode(&url("postgresql://phiseal@db:5432/keys"), 0o644, &[]).ok();
    for secret in [
        "postgresql://phiseal:pw-6628@db:5432/keys",
        "postgresql://phiseal:pw/6628@db:5432/keys",
        "postgresql://db:5432/keys?user=phiseal&password=pw-6628",
        "host=db user=phiseal password=pw-6628",
        "host=db user=phiseal password = pw-6628",
    ] {
        let run = check_text_with_mode(&url(secret), 0o644, &[]);
        run.fails_with("holds key_store.database_url and is readable");
        assert!(!run.stderr.contains("pw-6628"), "{}", run.stderr);
    }
    // A directory above it that others may write (without the sticky bit) could have the
    // file replaced; with the sticky bit (as /tmp) it could not.
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let file = shared.join("phiseald.toml");
    std::fs::write(&file, MINIMAL).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    check_file(&file, &[])
        .fails_with("its directory")
        .fails_with("is writable by group or others");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    check_file(&file, &[]).ok();
    // A symlink to a good file, in a directory others may write: they could point it at
    // another file.
    let elsewhere = dir.path().join("link-dir");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = elsewhere.join("phiseald.toml");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    check_file(&link, &[]).ok();
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o777)).unwrap();
    check_file(&link, &[])
        .fails_with(&format!("its directory {}", elsewhere.display()))
        .fails_with("is writable by group or others");
    // A chain of links: the directory holding the middle one counts too.
    let (first, middle, last) = (
        dir.path().join("first"),
        dir.path().join("middle"),
        dir.path().join("last"),
    );
    for d in [&first, &middle, &last] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(last.join("phiseald.toml"), MINIMAL).unwrap();
    std::os::unix::fs::symlink(last.join("phiseald.toml"), middle.join("link")).unwrap();
    std::os::unix::fs::symlink(middle.join("link"), first.join("link")).unwrap();
    check_file(&first.join("link"), &[]).ok();
    std::fs::set_permissions(&middle, std::fs::Permissions::from_mode(0o777)).unwrap();
    check_file(&first.join("link"), &[])
        .fails_with(&format!("its directory {}", middle.display()))
        .fails_with("is writable by group or others");
    // Another user's file, or a secret readable by another group (only root can make them
    // here: the suite runs as root in CI).
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::chown(&file, None, Some(65534)).unwrap();
        std::fs::write(&file, &with_pin).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        check_file(&file, &[])
            .fails_with("holds kms.pkcs11.pin and is readable by group or others");
        std::os::unix::fs::chown(&file, Some(65534), Some(0)).unwrap();
        check_file(&file, &[])
            .fails_with("belongs to uid 65534")
            .fails_with("chown it");
    }
}

#[test]
fn a_previous_pkcs11_key_on_the_same_token_must_use_the_same_pin() {
    let section = |table: &str, token: &str, key: &str, pin: &str| {
        format!(
            "[{table}]\nmodule = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"{token}\"\n\
             key_label = \"{key}\"\npin = \"{pin}\"\n"
        )
    };
    let config = |previous_token: &str, previous_pin: &str| {
        format!(
            "{MINIMAL}[kms]\nkind = \"pkcs11\"\n{}[kms.previous]\nkind = \"pkcs11\"\n{}",
            section("kms.pkcs11", "hsm", "root-2", "pin-4411"),
            section(
                "kms.previous.pkcs11",
                previous_token,
                "root-1",
                previous_pin
            ),
        )
    };
    let run = check_text(&config("hsm", "pin-9922"), &[]);
    run.fails_with("kms.previous.pkcs11.pin: differs from kms.pkcs11.pin for the same token");
    assert!(
        !run.stderr.contains("pin-4411") && !run.stderr.contains("pin-9922"),
        "{}",
        run.stderr
    );
    check_text(&config("hsm", "pin-4411"), &[]).ok();
    // Another token has a PIN of its own.
    check_text(&config("older-hsm", "pin-9922"), &[]).ok();
}

#[test]
fn a_previous_pkcs11_key_on_another_module_needs_a_reference_of_its_own() {
    // A copy of the library stands for another vendor's module; a symlink to it is the same.
    let vendor = tempfile::tempdir().unwrap();
    let copy = vendor.path().join("libvendor-pkcs11.so");
    std::fs::copy("/usr/lib/softhsm/libsofthsm2.so", &copy).unwrap();
    let section = |table: &str, module: &str, key: &str, previous: &str| {
        format!(
            "[{table}]\nmodule = \"{module}\"\ntoken_label = \"phiseal\"\n\
             key_label = \"{key}\"\nprevious_key_labels = [{previous}]\npin = \"pin-4411\"\n"
        )
    };
    let new_hsm = copy.to_str().unwrap();
    let old_hsm = "/usr/lib/softhsm/libsofthsm2.so";
    let config = |current_module: &str, current_key: &str, current_previous: &str| {
        format!(
            "{MINIMAL}[kms]\nkind = \"pkcs11\"\n{}[kms.previous]\nkind = \"pkcs11\"\n{}",
            section("kms.pkcs11", current_module, current_key, current_previous),
            section("kms.previous.pkcs11", old_hsm, "phiseal-root-1", ""),
        )
    };
    // A new HSM whose key has the old HSM's labels: the old keys would go to the new one.
    check_text(&config(new_hsm, "phiseal-root-1", ""), &[])
        .fails_with("kms.previous.pkcs11: a root key of kms.pkcs11 (on another module)")
        .fails_with("'pkcs11:phiseal/phiseal-root-1'");
    // Also through the new HSM's list of earlier labels.
    check_text(
        &config(new_hsm, "phiseal-root-2", "\"phiseal-root-1\""),
        &[],
    )
    .fails_with("same reference 'pkcs11:phiseal/phiseal-root-1'");
    // Another label on the new HSM tells them apart; on one module, one label is one key.
    check_text(&config(new_hsm, "phiseal-root-2", ""), &[]).ok();
    check_text(
        &config(old_hsm, "phiseal-root-2", "\"phiseal-root-1\""),
        &[],
    )
    .ok();
    // (Another path to the same library is the same module.)
    check_text(
        &config(
            "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
            "phiseal-root-1",
            "",
        ),
        &[],
    )
    .ok();
}
