//! Throwaway PostgreSQL clusters for tests (feature `testkit`), shared by this crate's tests
//! and by the daemon's multi-daemon tests: [`Cluster::start`] runs `initdb` (as the
//! `postgres` user when running as root) into a temporary directory and starts a server on a
//! free port of 127.0.0.1 with trust authentication (optionally TLS). The cluster is stopped
//! and deleted when dropped, and in any case when the process exits, however it exits: a
//! watchdog process (its own process group) waits for its stdin pipe to close, which the
//! kernel does when the test process ends. PostgreSQL missing or not starting panics with a
//! message saying what to install: a test *failure*, never a skip.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Names an existing server to test against instead of throwaway clusters.
pub const DATABASE_URL_ENV: &str = "PHISEAL_TEST_DATABASE_URL";
/// Overrides where the PostgreSQL server binaries (initdb, pg_ctl) are.
pub const PG_BIN_ENV: &str = "PHISEAL_TEST_PG_BIN";
/// The role with SCRAM password authentication that every throwaway cluster has.
pub const PASSWORD_ROLE: &str = "phiseal_pw";
pub const PASSWORD: &str = "Sup3r-Secret-PW-do-not-print";

fn fail(what: &str) -> ! {
    panic!(
        "PostgreSQL test harness: {what}\n\
         These tests need PostgreSQL server binaries (Debian: `apt-get install -y postgresql`; \
         or set {PG_BIN_ENV} to the directory holding initdb and pg_ctl), or an existing server \
         in {DATABASE_URL_ENV}=postgresql://user:password@host:port/db (the role must be allowed \
         to CREATE DATABASE). They fail rather than skip."
    )
}

/// The directory holding `initdb` and `pg_ctl`.
fn pg_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os(PG_BIN_ENV) {
        let dir = PathBuf::from(dir);
        if dir.join("initdb").is_file() {
            return dir;
        }
        fail(&format!("{PG_BIN_ENV}={} has no initdb", dir.display()));
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    candidates.sort();
    if let Some((_, bin)) = candidates.pop() {
        return bin;
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").is_file() {
            return dir;
        }
    }
    fail(
        "no PostgreSQL server binaries found (looked in /usr/lib/postgresql/*/bin and pg_config --bindir)",
    )
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Runs `program` as the `postgres` user when we are root (initdb refuses root), else as us.
fn pg_command(program: &Path) -> Command {
    if running_as_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| fail(&format!("could not run {what}: {e}")));
    if !out.status.success() {
        fail(&format!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| fail(&format!("no free port: {e}")))
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique suffix within this machine: pid and a counter.
pub fn unique() -> String {
    format!(
        "{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// What a throwaway cluster is started with.
#[derive(Default, Clone, Copy)]
pub struct ClusterOptions {
    /// `ssl = on` with a certificate for IP 127.0.0.1 signed by a fresh test CA
    /// ([`Cluster::ca_file`]).
    pub tls: bool,
}

/// A throwaway PostgreSQL cluster, stopped and deleted on drop.
pub struct Cluster {
    root: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    port: u16,
    watchdog: Option<Child>,
}

impl Cluster {
    pub fn start(options: ClusterOptions) -> Cluster {
        let bin = pg_bin();
        let root = std::env::temp_dir().join(format!("phiseal-pg-{}", unique()));
        std::fs::create_dir(&root)
            .unwrap_or_else(|e| fail(&format!("could not create {}: {e}", root.display())));
        // The watchdog first: from here on the directory is removed whatever happens.
        let watchdog = Self::watchdog(&bin, &root);
        if running_as_root() {
            run(
                Command::new("chown").arg("postgres:postgres").arg(&root),
                "chown of the cluster directory to the postgres user",
            );
        }
        let data = root.join("data");
        run(
            pg_command(&bin.join("initdb")).arg("-D").arg(&data).args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]),
            "initdb",
        );
        // SCRAM password authentication for one role, trust for everything else.
        let hba = data.join("pg_hba.conf");
        let rest = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(
            &hba,
            format!("host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n{rest}"),
        )
        .unwrap();
        if options.tls {
            make_certificates(&root);
            let mut conf = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("postgresql.conf"))
                .unwrap();
            use std::io::Write;
            writeln!(
                conf,
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'",
                root.join("server.crt").display(),
                root.join("server.key").display()
            )
            .unwrap();
        }
        let mut cluster = Cluster {
            root,
            data,
            bin,
            port: 0,
            watchdog: Some(watchdog),
        };
        // A port found free can be taken by someone else before the server binds it: retry.
        let mut last = String::new();
        for _ in 0..5 {
            cluster.port = free_port();
            match cluster.try_start() {
                Ok(()) => {
                    cluster.psql_admin(&format!(
                        "CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{PASSWORD}' CREATEDB"
                    ));
                    return cluster;
                }
                Err(e) => last = e,
            }
        }
        fail(&format!("pg_ctl start failed 5 times; last:\n{last}"))
    }

    fn watchdog(bin: &Path, root: &Path) -> Child {
        let pg_ctl = bin.join("pg_ctl");
        let stop = if running_as_root() {
            "runuser -u postgres -- \"$PG_CTL\""
        } else {
            "\"$PG_CTL\""
        };
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "read _ignored; {stop} -D \"$ROOT/data\" -m immediate -w stop >/dev/null 2>&1; \
                 rm -rf \"$ROOT\""
            ))
            .env("PG_CTL", pg_ctl)
            .env("ROOT", root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| fail(&format!("could not start the cleanup watchdog: {e}")))
    }

    fn try_start(&self) -> Result<(), String> {
        let log = self.root.join("server.log");
        let out = pg_command(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=150 \
                 -c shared_buffers=16MB",
                self.port,
                self.root.display()
            ))
            .arg("start")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("could not run pg_ctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}\n{}\n{}\nserver log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            ))
        }
    }

    /// Starts the stopped server again, on the same port.
    pub fn restart(&self) {
        if let Err(e) = self.try_start() {
            fail(&format!("pg_ctl start (restart) failed:\n{e}"));
        }
    }

    /// Stops the server (`-m fast`: clients are disconnected).
    pub fn stop(&self) {
        run(
            pg_command(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "fast", "-w", "stop"]),
            "pg_ctl stop",
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The test CA's certificate (clusters started with `tls`).
    pub fn ca_file(&self) -> PathBuf {
        self.root.join("ca.pem")
    }

    /// A second CA that signed nothing.
    pub fn other_ca_file(&self) -> PathBuf {
        self.root.join("other-ca.pem")
    }

    pub fn admin_url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn url(&self, dbname: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// Runs SQL as the superuser through psql (for set-up outside any Tokio runtime).
    pub fn psql_admin(&self, sql: &str) {
        self.psql(&self.admin_url(), sql);
    }

    /// Runs SQL as the superuser through psql in database `dbname`.
    pub fn psql_in(&self, dbname: &str, sql: &str) {
        self.psql(&self.url(dbname), sql);
    }

    fn psql(&self, url: &str, sql: &str) {
        run(&mut self.psql_command(url, sql), "psql");
    }

    /// The psql command that runs SQL as the superuser in database `dbname` (to run it in the
    /// background).
    pub fn psql_in_command(&self, dbname: &str, sql: &str) -> Command {
        self.psql_command(&self.url(dbname), sql)
    }

    fn psql_command(&self, url: &str, sql: &str) -> Command {
        let mut command = Command::new(self.bin.join("psql"));
        command
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(url)
            .arg("-c")
            .arg(sql);
        command
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = pg_command(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut watchdog) = self.watchdog.take() {
            // Closing its stdin lets the watchdog delete the directory; wait for it.
            drop(watchdog.stdin.take());
            let _ = watchdog.wait();
        }
    }
}

/// A CA, a server certificate for IP 127.0.0.1 signed by it, and an unrelated second CA.
fn make_certificates(root: &Path) {
    let script = r#"
set -e
cd "$ROOT"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=phiseal-test-ca -keyout ca.key -out ca.pem 2>/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=phiseal-other-ca -keyout other-ca.key -out other-ca.pem 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj /CN=127.0.0.1 -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n' > server.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
    -extfile server.ext -out server.crt 2>/dev/null
chmod 600 server.key
"#;
    run(
        Command::new("sh").arg("-c").arg(script).env("ROOT", root),
        "openssl (making test certificates)",
    );
    if running_as_root() {
        run(
            Command::new("chown")
                .arg("postgres:postgres")
                .arg(root.join("server.key"))
                .arg(root.join("server.crt")),
            "chown of the server key",
        );
    }
}
