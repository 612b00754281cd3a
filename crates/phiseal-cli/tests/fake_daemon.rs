//! Runs the `phiseal` binary against a fake daemon on a Unix socket: exit codes, error
//! messages, the token header, and rewrap's line-for-line output and resume. (End-to-end tests
//! against the real `phiseald` live with the daemon.)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)] // tests

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use phiseal_proto::v1::admin_service_server::{AdminService, AdminServiceServer};
use phiseal_proto::v1::field_service_server::{FieldService, FieldServiceServer};
use phiseal_proto::v1::*;
use tonic::{Code, Request, Response, Status};

/// What the fake daemon saw, one line per notable request.
type Seen = Arc<Mutex<Vec<String>>>;

#[derive(Clone)]
struct Fake {
    seen: Seen,
}

impl Fake {
    fn note(&self, s: String) {
        self.seen.lock().unwrap().push(s);
    }
}

fn status(code: Code, kind: &str, message: &str) -> Status {
    let mut s = Status::new(code, message);
    s.metadata_mut()
        .insert(phiseal_proto::ERROR_KIND_HEADER, kind.parse().unwrap());
    s
}

/// A fake v1 ciphertext: valid header, the plaintext XOR 0x5a as body, a zero tag.
fn fake_ciphertext(version: u32, plaintext: &[u8]) -> Vec<u8> {
    let mut c = vec![1u8, 1];
    c.extend_from_slice(&version.to_be_bytes());
    c.extend_from_slice(&[0u8; 22]);
    c.extend(plaintext.iter().map(|b| b ^ 0x5a));
    c.extend_from_slice(&[0u8; 16]);
    c
}

fn fake_open(c: &[u8]) -> (u32, Vec<u8>) {
    let version = u32::from_be_bytes(c[2..6].try_into().unwrap());
    (
        version,
        c[28..c.len() - 16].iter().map(|b| b ^ 0x5a).collect(),
    )
}

const PRIMARY: u32 = 2;

#[tonic::async_trait]
impl FieldService for Fake {
    async fn encrypt(
        &self,
        request: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(EncryptResponse {
            ciphertext: fake_ciphertext(PRIMARY, &r.plaintext),
            key_version: PRIMARY,
        }))
    }

    async fn decrypt(
        &self,
        request: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        let r = request.into_inner();
        let ctx = r.context.unwrap();
        if ctx.tenant == "gone" {
            return Err(status(
                Code::FailedPrecondition,
                "key_destroyed",
                "tenant 'gone' was shredded",
            ));
        }
        if ctx.field != "ssn" {
            return Err(status(
                Code::InvalidArgument,
                "decryption_failed",
                "decryption failed",
            ));
        }
        let (version, plaintext) = fake_open(&r.ciphertext);
        Ok(Response::new(DecryptResponse {
            plaintext,
            key_version: version,
        }))
    }

    async fn encrypt_batch(
        &self,
        _: Request<EncryptBatchRequest>,
    ) -> Result<Response<EncryptBatchResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn decrypt_batch(
        &self,
        _: Request<DecryptBatchRequest>,
    ) -> Result<Response<DecryptBatchResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn rewrap(
        &self,
        request: Request<RewrapRequest>,
    ) -> Result<Response<RewrapResponse>, Status> {
        let items = request.into_inner().items;
        self.note(format!("rewrap {}", items.len()));
        let results = items
            .into_iter()
            .map(|item| {
                let ctx = item.context.unwrap();
                if ctx.record.as_deref() == Some("bad") || ctx.tenant != "acme" {
                    return rewrap_result::Result::Error(ItemError {
                        code: Code::InvalidArgument as i32,
                        kind: "decryption_failed".into(),
                        message: "decryption failed".into(),
                    });
                }
                let (version, plaintext) = fake_open(&item.ciphertext);
                let changed = version < PRIMARY;
                rewrap_result::Result::Ok(Rewrapped {
                    ciphertext: if changed {
                        fake_ciphertext(PRIMARY, &plaintext)
                    } else {
                        item.ciphertext
                    },
                    key_version: PRIMARY,
                    changed,
                })
            })
            .map(|r| RewrapResult { result: Some(r) })
            .collect();
        Ok(Response::new(RewrapResponse { results }))
    }
}

#[tonic::async_trait]
impl AdminService for Fake {
    async fn create_tenant(
        &self,
        request: Request<CreateTenantRequest>,
    ) -> Result<Response<CreateTenantResponse>, Status> {
        if request.get_ref().tenant == "exists" {
            return Err(status(
                Code::AlreadyExists,
                "tenant_exists",
                "tenant 'exists' already exists",
            ));
        }
        Ok(Response::new(CreateTenantResponse { key_version: 1 }))
    }

    async fn rotate_tenant_key(
        &self,
        request: Request<RotateTenantKeyRequest>,
    ) -> Result<Response<RotateTenantKeyResponse>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        self.note(format!("rotate auth={auth:?}"));
        if auth.as_deref() != Some("Bearer phst_good") {
            return Err(status(
                Code::Unauthenticated,
                "unauthenticated",
                "unknown token",
            ));
        }
        Ok(Response::new(RotateTenantKeyResponse { key_version: 3 }))
    }

    async fn set_min_decryption_version(
        &self,
        request: Request<SetMinDecryptionVersionRequest>,
    ) -> Result<Response<SetMinDecryptionVersionResponse>, Status> {
        if request.get_ref().tenant == "missing" {
            return Err(status(
                Code::NotFound,
                "tenant_not_found",
                "tenant 'missing' not found",
            ));
        }
        Ok(Response::new(SetMinDecryptionVersionResponse {}))
    }

    async fn key_status(
        &self,
        request: Request<KeyStatusRequest>,
    ) -> Result<Response<KeyStatusResponse>, Status> {
        let tenant = request.into_inner().tenant;
        if tenant == "slow" {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        }
        Ok(Response::new(KeyStatusResponse {
            tenant,
            primary_version: Some(2),
            min_decryption_version: 1,
            shredded_at: None,
            versions: vec![
                KeyVersion {
                    version: 1,
                    state: KeyState::DecryptOnly as i32,
                    decrypts: true,
                    root_key_ref: "local:root".into(),
                    created_at: Some(prost_types::Timestamp {
                        seconds: 0,
                        nanos: 0,
                    }),
                },
                KeyVersion {
                    version: 2,
                    state: KeyState::Primary as i32,
                    decrypts: true,
                    root_key_ref: "local:root".into(),
                    created_at: Some(prost_types::Timestamp {
                        seconds: 60,
                        nanos: 0,
                    }),
                },
            ],
        }))
    }

    async fn shred_tenant(
        &self,
        request: Request<ShredTenantRequest>,
    ) -> Result<Response<ShredTenantResponse>, Status> {
        let r = request.into_inner();
        self.note(format!("shred {} confirm {}", r.tenant, r.confirm_tenant));
        if r.tenant != r.confirm_tenant {
            return Err(status(
                Code::InvalidArgument,
                "invalid_input",
                "confirm_tenant differs",
            ));
        }
        Ok(Response::new(ShredTenantResponse {}))
    }
}

/// A fake daemon serving on a socket in a temporary directory until dropped.
struct Daemon {
    runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    socket: PathBuf,
    seen: Seen,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("phiseald.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let seen = Seen::default();
        let fake = Fake { seen: seen.clone() };
        let listener = {
            let _guard = runtime.enter();
            tokio::net::UnixListener::bind(&socket).unwrap()
        };
        runtime.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(FieldServiceServer::new(fake.clone()))
                .add_service(AdminServiceServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
                .await
        });
        Daemon {
            runtime,
            dir,
            socket,
            seen,
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `phiseal --socket <fake> args…` with `stdin`.
    fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        let _ = &self.runtime;
        run_with(&self.socket, args, stdin, &[])
    }
}

fn run_with(socket: &Path, args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_phiseal"));
    cmd.arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("PHISEAL_TOKEN")
        .env_remove("PHISEAL_SOCKET")
        .env_remove("PHISEAL_DATA_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let _ = input.write_all(stdin);
    drop(input);
    child.wait_with_output().unwrap()
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn encrypt_then_decrypt_round_trips_raw_bytes() {
    let d = Daemon::start();
    let plaintext = b"123-45-6789\n\0\xff ";
    let out = d.run(
        &["encrypt", "--tenant", "acme", "--field", "ssn"],
        plaintext,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("phs1:") && text.ends_with('\n'), "{text}");
    assert_eq!(text.matches('\n').count(), 1);

    let out = d.run(
        &["decrypt", "--tenant", "acme", "--field", "ssn"],
        format!("\n  {text}  \n").as_bytes(),
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(out.stdout, plaintext);

    let out = d.run(
        &["--json", "encrypt", "--tenant", "acme", "--field", "ssn"],
        b"x",
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["key_version"], 2);
    let ct = v["ciphertext"].as_str().unwrap().to_owned();

    let out = d.run(
        &["decrypt", "--tenant", "acme", "--field", "ssn", "--json"],
        ct.as_bytes(),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["plaintext_base64"], "eA==");
    assert_eq!(v["key_version"], 2);
}

#[test]
fn decrypt_errors_map_to_exit_codes_without_plaintext() {
    let d = Daemon::start();
    let ct = phiseal::format::to_text(&fake_ciphertext(1, b"SECRET-PHI"));
    let out = d.run(
        &["decrypt", "--tenant", "gone", "--field", "ssn"],
        ct.as_bytes(),
    );
    assert_eq!(code(&out), 6);
    assert_eq!(
        stderr(&out).trim(),
        "phiseal: decrypt: tenant 'gone' was shredded (key_destroyed)"
    );
    let out = d.run(
        &["decrypt", "--tenant", "acme", "--field", "dob"],
        ct.as_bytes(),
    );
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("(decryption_failed)"));
    assert!(out.stdout.is_empty());
    let out = d.run(
        &["decrypt", "--tenant", "acme", "--field", "ssn"],
        b"SECRET-PHI",
    );
    assert_eq!(code(&out), 1);
    assert!(!stderr(&out).contains("SECRET"), "{}", stderr(&out));
}

#[test]
fn admin_commands_and_their_exit_codes() {
    let d = Daemon::start();
    let out = d.run(&["tenant", "create", "acme"], b"");
    assert_eq!(
        (code(&out), stdout(&out).trim()),
        (0, "created tenant 'acme' (key version 1)")
    );
    let out = d.run(&["tenant", "create", "exists"], b"");
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("(tenant_exists)"));
    let out = d.run(
        &[
            "key",
            "min-version",
            "--tenant",
            "missing",
            "--version",
            "2",
        ],
        b"",
    );
    assert_eq!(code(&out), 4);
    let out = d.run(
        &[
            "key",
            "min-version",
            "--tenant",
            "acme",
            "--version",
            "2",
            "--json",
        ],
        b"",
    );
    assert_eq!(
        stdout(&out).trim(),
        r#"{"min_decryption_version":2,"tenant":"acme"}"#
    );

    let out = d.run(&["key", "status", "--tenant", "acme"], b"");
    assert_eq!(code(&out), 0);
    let text = stdout(&out);
    assert!(text.contains("primary version: 2"), "{text}");
    assert!(
        text.contains("2        primary       yes       1970-01-01T00:01:00Z  local:root"),
        "{text}"
    );
    let out = d.run(&["key", "status", "--tenant", "acme", "--json"], b"");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["versions"].as_array().unwrap().len(), 2);
}

#[test]
fn deadline_is_enforced() {
    let d = Daemon::start();
    let out = d.run(
        &["--timeout", "1", "key", "status", "--tenant", "slow"],
        b"",
    );
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(stderr(&out).contains("deadline"), "{}", stderr(&out));
}

#[test]
fn token_is_sent_as_bearer_and_token_file_mode_is_checked() {
    let d = Daemon::start();
    let out = d.run(&["key", "rotate", "--tenant", "acme"], b"");
    assert_eq!(code(&out), 3);
    assert!(stderr(&out).contains("(unauthenticated)"));

    let file = d.path("token");
    std::fs::write(&file, "phst_good\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let file_arg = file.to_str().unwrap();
    let out = d.run(
        &[
            "key",
            "rotate",
            "--tenant",
            "acme",
            "--token-file",
            file_arg,
        ],
        b"",
    );
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = d.run(
        &[
            "key",
            "rotate",
            "--tenant",
            "acme",
            "--token-file",
            file_arg,
        ],
        b"",
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        "rotated tenant 'acme': the primary key version is now 3"
    );

    let out = run_with(
        &d.socket,
        &["key", "rotate", "--tenant", "acme", "--json"],
        b"",
        &[("PHISEAL_TOKEN", "phst_good")],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        d.seen()
            .iter()
            .filter(|s| s.starts_with("rotate"))
            .cloned()
            .collect::<Vec<_>>(),
        [
            "rotate auth=None",
            "rotate auth=Some(\"Bearer phst_good\")",
            "rotate auth=Some(\"Bearer phst_good\")"
        ]
    );
}

#[test]
fn unreachable_socket_is_exit_5_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nope.sock");
    let out = run_with(&socket, &["key", "status", "--tenant", "acme"], b"", &[]);
    assert_eq!(code(&out), 5);
    let err = stderr(&out);
    assert!(err.contains(socket.to_str().unwrap()), "{err}");
    assert!(err.contains("check that the daemon runs"), "{err}");
}

#[test]
fn shred_needs_confirmation() {
    let d = Daemon::start();
    let out = d.run(&["shred", "--tenant", "acme"], b"acme\n");
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("--yes"));
    assert!(d.seen().iter().all(|s| !s.starts_with("shred")));
    let out = d.run(&["shred", "--tenant", "acme", "--yes"], b"");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(d.seen(), ["shred acme confirm acme"]);
}

fn text(version: u32, plaintext: &str) -> String {
    phiseal::format::to_text(&fake_ciphertext(version, plaintext.as_bytes()))
}

/// Input lines and the output expected for them with --field ssn.
fn rewrap_case() -> (String, String) {
    let lines = [
        (text(1, "a"), text(2, "a")),
        (String::new(), String::new()),
        (text(2, "b"), text(2, "b")),
        (
            format!(
                r#"{{"id": 7, "record": "r7", "ciphertext": "{}", "x": [1, 2.0]}}"#,
                text(1, "c")
            ),
            format!(
                r#"{{"id":7,"record":"r7","ciphertext":"{}","x":[1, 2.0]}}"#,
                text(2, "c")
            ),
        ),
        ("garbage".to_owned(), "garbage".to_owned()),
        (
            format!(r#"{{"record": "bad", "ciphertext": "{}"}}"#, text(1, "d")),
            format!(r#"{{"record": "bad", "ciphertext": "{}"}}"#, text(1, "d")),
        ),
        (text(1, "e"), text(2, "e")),
    ];
    let join = |f: fn(&(String, String)) -> &String| {
        lines
            .iter()
            .map(|l| format!("{}\n", f(l)))
            .collect::<String>()
    };
    (join(|l| &l.0), join(|l| &l.1))
}

#[test]
fn rewrap_keeps_lines_in_place_and_reports_failures() {
    let d = Daemon::start();
    let (input, want) = rewrap_case();
    let out = d.run(
        &[
            "rewrap", "--tenant", "acme", "--field", "ssn", "--batch", "3",
        ],
        input.as_bytes(),
    );
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert_eq!(stdout(&out), want);
    let err = stderr(&out);
    assert!(err.contains("line 5: malformed_ciphertext: "), "{err}");
    assert!(
        err.contains("line 6: decryption_failed: decryption failed"),
        "{err}"
    );
    assert!(
        err.contains("rewrap: 7 lines: 3 rewrapped, 1 already current, 2 failed, 1 empty"),
        "{err}"
    );
    for line in input.lines().filter(|l| l.contains("phs1:")) {
        let ciphertext = line
            .split('"')
            .find(|s| s.starts_with("phs1:"))
            .unwrap_or(line);
        assert!(!err.contains(ciphertext), "{err}");
    }
    // Batches of 3 lines; only parsable ciphertexts are sent: lines 1 and 3 (line 2 is
    // empty), lines 4 and 6 (line 5 is garbage), line 7.
    assert_eq!(d.seen(), ["rewrap 2", "rewrap 2", "rewrap 1"]);
}

#[test]
fn rewrap_to_file_resumes_after_a_torn_line() {
    let d = Daemon::start();
    let (input, want) = rewrap_case();
    let input_file = d.path("in.txt");
    std::fs::write(&input_file, &input).unwrap();
    let output_file = d.path("out.txt");
    // Two complete lines and half of the third, as a crash would leave them.
    let done: String = want.lines().take(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(&output_file, format!("{done}phs1:AAA")).unwrap();
    let (i, o) = (input_file.to_str().unwrap(), output_file.to_str().unwrap());
    let args = [
        "rewrap", "--tenant", "acme", "--field", "ssn", "--input", i, "--output", o,
    ];

    let out = d.run(&args, b"");
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("--resume"), "{}", stderr(&out));

    let resumed: Vec<&str> = args.iter().copied().chain(["--resume", "--json"]).collect();
    let out = d.run(&resumed, b"");
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&output_file).unwrap(), want);
    assert!(out.stdout.is_empty());
    let summary = stderr(&out)
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap()
        .to_owned();
    let v: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert_eq!(
        (v["lines"].as_u64(), v["skipped"].as_u64()),
        (Some(5), Some(2))
    );
    // Line numbers count from the start of the input.
    assert!(stderr(&out).contains("line 5: malformed_ciphertext"));

    // Everything is done: a second resume has nothing left to do.
    let out = d.run(&resumed, b"");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&output_file).unwrap(), want);

    let fresh = d.path("fresh.txt");
    let out = d.run(
        &[
            "rewrap",
            "--tenant",
            "acme",
            "--field",
            "ssn",
            "--input",
            i,
            "--output",
            fresh.to_str().unwrap(),
        ],
        b"",
    );
    assert_eq!(code(&out), 7);
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn token_new_prints_token_and_config() {
    let out = run_with(
        Path::new("/nonexistent"),
        &["token", "new", "--name", "billing"],
        b"",
        &[],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    let mut lines = text.lines();
    let token = lines.next().unwrap();
    assert!(
        token.starts_with("phst_") && token.len() == 5 + 43,
        "{token}"
    );
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(token.as_bytes()));
    assert_eq!(
        lines.collect::<Vec<_>>(),
        [
            "",
            "[[tokens]]",
            "name = \"billing\"",
            &format!("sha256 = \"{hash}\"")
        ]
    );

    let out = run_with(
        Path::new("/nonexistent"),
        &["token", "new", "--name", "b", "--json"],
        b"",
        &[],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = v["token"].as_str().unwrap();
    assert_eq!(
        v["sha256"],
        hex::encode(sha2::Sha256::digest(token.as_bytes()))
    );
    assert!(
        v["config_toml"]
            .as_str()
            .unwrap()
            .starts_with("[[tokens]]\nname = \"b\"\n")
    );

    let out = run_with(
        Path::new("/nonexistent"),
        &["token", "new", "--name", "a\"b"],
        b"",
        &[],
    );
    assert_eq!(code(&out), 2);
}

fn write_log(path: &Path) {
    use phiseal::audit::{Action, AuditEvent, Outcome};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let log =
            phiseal_audit_file::FileAuditLog::open(path, phiseal_audit_file::Durability::Strict)
                .unwrap();
        let event = |tenant: &str, seconds: i64| AuditEvent {
            time: jiff::Timestamp::from_second(seconds).unwrap(),
            actor: phiseal::Actor::named("test"),
            action: Action::Encrypt,
            tenant: Some(phiseal::TenantId::new(tenant).unwrap()),
            field: Some("ssn".into()),
            record: None,
            key_version: Some(1),
            key_source: None,
            outcome: Outcome::Ok,
            request_id: "req-1".into(),
        };
        log.append_events(&[
            event("acme", 1_700_000_000),
            event("other", 1_700_000_100),
            event("acme", 1_700_000_200),
        ])
        .await
        .unwrap();
        log.flush_log().await.unwrap();
    });
}

#[test]
fn audit_verify_and_export() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("audit.log");
    write_log(&log);
    let nowhere = Path::new("/nonexistent");
    let data_dir = dir.path().to_str().unwrap();

    let out = run_with(
        nowhere,
        &["audit", "verify", "--data-dir", data_dir],
        b"",
        &[],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("records checked: 4"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("result: intact"));

    let out = run_with(
        nowhere,
        &["audit", "export", "--tenant", "acme"],
        b"",
        &[("PHISEAL_DATA_DIR", data_dir)],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 2);
    let out = run_with(
        nowhere,
        &[
            "audit",
            "export",
            "--tenant",
            "acme",
            "--log",
            log.to_str().unwrap(),
            "--since",
            "2023-11-14T22:14:00Z",
        ],
        b"",
        &[],
    );
    assert_eq!(stdout(&out).lines().count(), 1, "{}", stderr(&out));

    // Tamper with the second record: verification and export both fail with 8.
    let content = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, content.replacen("\"other\"", "\"OTHER\"", 1)).unwrap();
    let out = run_with(
        nowhere,
        &["audit", "verify", "--log", log.to_str().unwrap(), "--json"],
        b"",
        &[],
    );
    assert_eq!(code(&out), 8);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["intact"], false);
    assert_eq!(v["problems"][0]["kind"], "hash_mismatch");
    assert_eq!(v["problems"][0]["line"], 3);
    let out = run_with(
        nowhere,
        &[
            "audit",
            "export",
            "--tenant",
            "acme",
            "--log",
            log.to_str().unwrap(),
        ],
        b"",
        &[],
    );
    assert_eq!(code(&out), 8, "{}", stderr(&out));

    let out = run_with(
        nowhere,
        &["audit", "verify", "--log", "/nonexistent/audit.log"],
        b"",
        &[],
    );
    assert_eq!(code(&out), 1);
}
