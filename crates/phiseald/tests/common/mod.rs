//! Test harness: starts the real `phiseald` binary on a temporary socket and talks to it with
//! the generated gRPC clients.
#![allow(
    dead_code,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use pb::admin_service_client::AdminServiceClient;
use pb::field_service_client::FieldServiceClient;
use phiseal_proto::v1 as pb;
use tonic::transport::Channel;

/// A running daemon in its own temporary directory (mode 0755, so other users can reach the
/// socket directory when a test wants them to).
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub data_dir: PathBuf,
    pub child: Option<Child>,
    pub stderr_path: PathBuf,
}

pub fn bin(name: &str) -> PathBuf {
    let daemon = PathBuf::from(env!("CARGO_BIN_EXE_phiseald"));
    if name == "phiseald" {
        return daemon;
    }
    let path = daemon.with_file_name(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// `toml` with `profile = "development"` in front unless it names a profile: a config file
/// is production by default, which refuses the local KMS that most tests run on.
pub fn development(toml: &str) -> String {
    if toml.contains("profile =") {
        toml.to_owned()
    } else {
        format!("profile = \"development\"\n{toml}")
    }
}

impl Daemon {
    /// The embedded default: `--socket --data-dir`, no config file.
    pub fn embedded() -> Self {
        Self::start(None, |_| {})
    }

    /// With a config file; `{socket}` and `{data_dir}` and `{dir}` in `toml` are replaced.
    /// A file that names no profile gets `profile = "development"` (see [`development`]).
    pub fn with_config(toml: &str) -> Self {
        Self::start(Some(toml), |_| {})
    }

    pub fn start(config: Option<&str>, tweak: impl FnOnce(&mut Command)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let socket = dir.path().join("run/phiseald.sock");
        let data_dir = dir.path().join("data");
        let stderr_path = dir.path().join("phiseald.stderr");
        let mut cmd = Command::new(bin("phiseald"));
        match config {
            None => {
                cmd.arg("--socket")
                    .arg(&socket)
                    .arg("--data-dir")
                    .arg(&data_dir);
            }
            Some(text) => {
                let text = development(text)
                    .replace("{socket}", socket.to_str().unwrap())
                    .replace("{data_dir}", data_dir.to_str().unwrap())
                    .replace("{dir}", dir.path().to_str().unwrap());
                let path = dir.path().join("phiseald.toml");
                std::fs::write(&path, text).unwrap();
                cmd.arg("--config").arg(&path);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .env("PHISEALD_LOG__LEVEL", "info");
        tweak(&mut cmd);
        let child = cmd.spawn().unwrap();
        let mut daemon = Self {
            dir,
            socket,
            data_dir,
            child: Some(child),
            stderr_path,
        };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("phiseald exited early ({status}): {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("phiseald did not listen within 20 s: {}", self.stderr());
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn audit_log(&self) -> PathBuf {
        self.data_dir.join("audit.log")
    }

    pub fn audit_text(&self) -> String {
        std::fs::read_to_string(self.audit_log()).unwrap()
    }

    pub async fn channel(&self) -> Channel {
        phiseal_proto::connect_unix(&self.socket).await.unwrap()
    }

    pub async fn fields(&self) -> FieldServiceClient<Channel> {
        FieldServiceClient::new(self.channel().await)
    }

    pub async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel().await)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let pid = rustix::process::Pid::from_raw(self.pid()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    }

    /// Waits for the process to exit (at most `limit`).
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "phiseald did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (for example `STOP` and `CONT` to freeze and thaw the daemon).
    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid()).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// Runs the real `phiseal` CLI against this daemon (`--socket`), feeding it `stdin`.
    pub fn cli(&self, args: &[&str], stdin: &[u8]) -> CliRun {
        let mut cmd = cli_command(&bin("phiseal"), &self.socket);
        cmd.args(args);
        run_cli(&mut cmd, stdin)
    }

    /// SIGTERM and a clean exit.
    pub fn stop(&mut self) {
        self.sigterm();
        let status = self.wait_exit(Duration::from_secs(30));
        assert!(
            status.success(),
            "phiseald exit {status}: {}",
            self.stderr()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn ctx(tenant: &str, field: &str, record: Option<&str>) -> Option<pb::Context> {
    Some(pb::Context {
        tenant: tenant.into(),
        field: field.into(),
        record: record.map(Into::into),
    })
}

pub fn kind(status: &tonic::Status) -> String {
    status
        .metadata()
        .get(phiseal_proto::ERROR_KIND_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// A request carrying a bearer token.
pub fn with_token<T>(body: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(body);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// The audit log's records, one JSON object each: a batch line (the records of one call)
/// becomes one object per record, with the line's common members and `seq` counted on.
pub fn audit_records(log: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for line in std::fs::read_to_string(log).unwrap().lines() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["kind"] != "batch" {
            out.push(v);
            continue;
        }
        let common = v.as_object_mut().unwrap();
        let records = common.remove("records").unwrap();
        common.remove("kind");
        let seq = common["seq"].as_u64().unwrap();
        for (i, r) in records.as_array().unwrap().iter().enumerate() {
            let mut record = common.clone();
            record.insert("seq".into(), (seq + i as u64).into());
            record.extend(r.as_object().unwrap().clone());
            out.push(serde_json::Value::Object(record));
        }
    }
    out
}

/// The `result` of each audit record of `action` on `log`, in order.
pub fn audit_results(log: &Path, action: &str) -> Vec<String> {
    audit_records(log)
        .iter()
        .filter(|r| r["action"] == action)
        .map(|r| r["result"].as_str().unwrap_or_default().to_owned())
        .collect()
}

pub async fn create_tenant(d: &Daemon, tenant: &str) {
    d.admin()
        .await
        .create_tenant(pb::CreateTenantRequest {
            tenant: tenant.into(),
        })
        .await
        .unwrap();
}

/// Rotates the key of `tenant` through the admin API.
pub async fn rotate_tenant(d: &Daemon, tenant: &str) {
    d.admin()
        .await
        .rotate_tenant_key(pb::RotateTenantKeyRequest {
            tenant: tenant.into(),
            expected_latest_version: None,
        })
        .await
        .unwrap();
}

/// Shreds `tenant` through the admin API (confirmed).
pub async fn shred_tenant(d: &Daemon, tenant: &str) {
    d.admin()
        .await
        .shred_tenant(pb::ShredTenantRequest {
            tenant: tenant.into(),
            confirm_tenant: tenant.into(),
        })
        .await
        .unwrap();
}

/// GET over plain HTTP/1.0; returns the body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What one run of the `phiseal` CLI did.
#[derive(Debug)]
pub struct CliRun {
    /// The exit code.
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl CliRun {
    /// Asserts the exit code (showing both outputs if it differs) and returns the run.
    #[track_caller]
    pub fn expect(self, code: i32) -> Self {
        assert_eq!(
            self.code,
            code,
            "phiseal exit code\n--- stdout:\n{}\n--- stderr:\n{}",
            String::from_utf8_lossy(&self.stdout),
            self.stderr
        );
        self
    }

    /// Stdout as text.
    #[track_caller]
    pub fn out(&self) -> String {
        String::from_utf8(self.stdout.clone()).expect("stdout is UTF-8")
    }

    /// Stdout as one JSON value.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.out()))
    }
}

/// `program --socket SOCKET` with every std stream piped and no `PHISEAL_*` variable inherited.
pub fn cli_command(program: &Path, socket: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.arg("--socket")
        .arg(socket)
        .env_remove("PHISEAL_TOKEN")
        .env_remove("PHISEAL_SOCKET")
        .env_remove("PHISEAL_DATA_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `cmd` (from [`cli_command`]) with `stdin` and collects what it did.
pub fn run_cli(cmd: &mut Command, stdin: &[u8]) -> CliRun {
    use std::io::Write;
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    // A separate writer: a command that answers before reading everything cannot deadlock.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap();
    CliRun {
        code: output
            .status
            .code()
            .unwrap_or_else(|| panic!("phiseal was killed: {}", output.status)),
        stdout: output.stdout,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Opens a gRPC call to `path` on a connection of its own (a raw HTTP/2 client), its
/// message not sent yet: the future of the answer, and the request body to send it on.
pub async fn raw_grpc_call(
    d: &Daemon,
    path: &str,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let io = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
    let (client, connection) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    client.send_request(request, false).unwrap()
}

/// Opens an `Encrypt` call on a connection of its own (a raw HTTP/2 client) whose message
/// never finishes arriving: a gRPC frame header announcing 1000 bytes, then 10 of them.
/// Returns the future of the answer, and the request body (the call stays open while held).
pub async fn stuck_unary_call(
    d: &Daemon,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let (response, mut body) = raw_grpc_call(d, "/phiseal.v1.FieldService/Encrypt").await;
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0x03, 0xe8]), false)
        .unwrap();
    body.send_data(bytes::Bytes::from_static(&[0; 10]), false)
        .unwrap();
    (response, body)
}
