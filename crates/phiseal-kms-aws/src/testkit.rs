//! A real moto KMS server for tests (feature `testkit`), shared by this crate's tests and by
//! the daemon's and CLI's end-to-end tests: [`Moto::start`] runs the executable named by
//! `PHISEAL_MOTO_SERVER` on a free port of 127.0.0.1 and kills it when dropped (panicking
//! tests included: `Drop` runs during unwinding; a test process killed by a signal can leave
//! its moto behind). [`Moto::suspend`] / [`Moto::resume`] stop and continue the process
//! (SIGSTOP / SIGCONT): the KMS hangs, as in a real outage, and keeps its keys (moto keeps
//! state in memory only, so a restarted server has none). If `PHISEAL_MOTO_SERVER` is unset
//! the tests fail: they never skip.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_kms::config::Credentials;

/// The static credentials moto accepts (any would do); set them as `AWS_ACCESS_KEY_ID` /
/// `AWS_SECRET_ACCESS_KEY` for a process that uses the standard credential chain.
pub const ACCESS_KEY_ID: &str = "test";
/// See [`ACCESS_KEY_ID`].
pub const SECRET_ACCESS_KEY: &str = "test";
/// The region the tests use.
pub const REGION: &str = "us-east-1";

const INSTALL_HINT: &str = "PHISEAL_MOTO_SERVER is not set: the AWS KMS tests need a moto \
    server. Run scripts/test, or create a virtualenv with `python3 -m venv /tmp/moto-venv && \
    /tmp/moto-venv/bin/pip install 'moto[kms]==5.2.5' flask==3.1.3 flask-cors==6.0.5` and set \
    PHISEAL_MOTO_SERVER=/tmp/moto-venv/bin/moto_server";

/// A running `moto_server`, killed when dropped.
pub struct Moto {
    child: Option<Child>,
    pub port: u16,
    tls: bool,
}

impl Moto {
    pub fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Moto::start_on(port)
    }

    pub fn start_on(port: u16) -> Moto {
        Moto::start_with(port, false)
    }

    /// A moto serving HTTPS with a certificate of its own making, which no client trusts
    /// ([`Moto::url`] is then `https://`).
    pub fn start_tls() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Moto::start_with(port, true)
    }

    fn start_with(port: u16, tls: bool) -> Moto {
        let exe =
            std::env::var_os("PHISEAL_MOTO_SERVER").unwrap_or_else(|| panic!("{INSTALL_HINT}"));
        let mut command = Command::new(&exe);
        command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        if tls {
            command.arg("--ssl");
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {exe:?}: {e}; {INSTALL_HINT}"));
        let mut moto = Moto {
            child: Some(child),
            port,
            tls,
        };
        moto.wait_ready();
        moto
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("moto_server exited before answering: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer on port {} within 30 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Stops the process without killing it (SIGSTOP): connections are accepted by the
    /// kernel but never answered, as with a hung KMS.
    pub fn suspend(&self) {
        self.signal("STOP");
    }

    /// Continues a suspended process (SIGCONT), with its keys.
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("moto is running").id();
        let status = Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {pid}: {status}");
    }

    /// Deletes every key (moto's `/moto-api/reset`), as a key deleted at the KMS: later
    /// calls naming them are refused (`NotFoundException`). Plain-HTTP servers only. (moto
    /// does not enforce a disabled key's state, so disabling cannot stand in for this.)
    pub fn forget_keys(&self) {
        use std::io::{Read, Write};
        assert!(!self.tls, "forget_keys needs the plain-HTTP server");
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "POST /moto-api/reset HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
            "{answer}"
        );
    }

    /// Kills the server (its keys are lost).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An SDK client for the moto at `url`, with static test credentials.
pub async fn client(url: &str) -> aws_sdk_kms::Client {
    let conf = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(url)
        .region(aws_config::Region::new(REGION))
        .credentials_provider(Credentials::new(
            ACCESS_KEY_ID,
            SECRET_ACCESS_KEY,
            None,
            None,
            "static-test",
        ))
        .load()
        .await;
    aws_sdk_kms::Client::new(&conf)
}

/// Creates a symmetric key and returns its ARN.
pub async fn create_key(client: &aws_sdk_kms::Client) -> String {
    let out = client.create_key().send().await.unwrap();
    out.key_metadata().unwrap().arn().unwrap().to_owned()
}
