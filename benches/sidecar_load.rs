//! Load generator for the sidecar: unary and batch throughput and p50/p99 latency of
//! `phiseald` over its Unix socket, next to a bare tonic echo service (same proto, same kind
//! of socket, its own process, no crypto, no audit) measured in the same run, in alternating
//! rounds.
//!
//! ```text
//! cargo build --release -p phiseald -p phiseal-benches --bin sidecar-load
//! target/release/sidecar-load [--seconds 5] [--rounds 5] [--phiseald PATH]
//! ```
//! The daemon runs the embedded default (audit log on, `interval` durability) in a temporary
//! directory. Prints a Markdown table (for docs/PERFORMANCE.md).
#![forbid(unsafe_code)]
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)] // a benchmark tool: fails loudly

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use pb::field_service_client::FieldServiceClient;
use pb::field_service_server::{FieldService, FieldServiceServer};
use phiseal_proto::v1 as pb;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

#[derive(Debug, Parser)]
struct Args {
    /// Measured seconds per scenario and server (after a one-second warm-up of each).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Alternating rounds the measured seconds are split into (echo, daemon, echo, …), so
    /// that both servers see the same machine conditions.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// The phiseald binary (default: next to this one).
    #[arg(long)]
    phiseald: Option<PathBuf>,
    /// Internal: serve the echo service on this socket.
    #[arg(long, hide = true)]
    echo_server: Option<PathBuf>,
    /// Fields per batch call.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Calls in flight for the batch scenarios.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4, 16])]
    batch_in_flight: Vec<usize>,
    /// Run only the scenarios whose name contains this text.
    #[arg(long)]
    only: Option<String>,
}

/// The baseline: FieldService answering with what it was sent.
struct Echo;

#[tonic::async_trait]
impl FieldService for Echo {
    async fn encrypt(
        &self,
        r: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        Ok(Response::new(pb::EncryptResponse {
            ciphertext: r.into_inner().plaintext,
            key_version: 1,
        }))
    }
    async fn decrypt(
        &self,
        r: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        Ok(Response::new(pb::DecryptResponse {
            plaintext: r.into_inner().ciphertext,
            key_version: 1,
        }))
    }
    async fn encrypt_batch(
        &self,
        r: Request<pb::EncryptBatchRequest>,
    ) -> Result<Response<pb::EncryptBatchResponse>, Status> {
        let results = r
            .into_inner()
            .items
            .into_iter()
            .map(|i| pb::EncryptResult {
                result: Some(pb::encrypt_result::Result::Ok(pb::EncryptResponse {
                    ciphertext: i.plaintext,
                    key_version: 1,
                })),
            })
            .collect();
        Ok(Response::new(pb::EncryptBatchResponse { results }))
    }
    async fn decrypt_batch(
        &self,
        r: Request<pb::DecryptBatchRequest>,
    ) -> Result<Response<pb::DecryptBatchResponse>, Status> {
        let results = r
            .into_inner()
            .items
            .into_iter()
            .map(|i| pb::DecryptResult {
                result: Some(pb::decrypt_result::Result::Ok(pb::DecryptResponse {
                    plaintext: i.ciphertext,
                    key_version: 1,
                })),
            })
            .collect();
        Ok(Response::new(pb::DecryptBatchResponse { results }))
    }
    async fn rewrap(
        &self,
        _r: Request<pb::RewrapRequest>,
    ) -> Result<Response<pb::RewrapResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }

    // The load generator measures the field RPCs above only.
    type EncryptStreamStream = EchoStream;
    type DecryptStreamStream = EchoStream;

    async fn encrypt_deterministic(
        &self,
        _r: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }

    async fn blind_index(
        &self,
        _r: Request<pb::BlindIndexRequest>,
    ) -> Result<Response<pb::BlindIndexResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }

    async fn search_terms(
        &self,
        _r: Request<pb::SearchTermsRequest>,
    ) -> Result<Response<pb::SearchTermsResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }

    async fn encrypt_stream(
        &self,
        _r: Request<tonic::Streaming<pb::EncryptStreamRequest>>,
    ) -> Result<Response<EchoStream>, Status> {
        Err(Status::unimplemented("echo"))
    }

    async fn decrypt_stream(
        &self,
        _r: Request<tonic::Streaming<pb::DecryptStreamRequest>>,
    ) -> Result<Response<EchoStream>, Status> {
        Err(Status::unimplemented("echo"))
    }
}

/// The (never produced) answer stream of the echo server's streaming RPCs.
type EchoStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::StreamChunk, Status>> + Send>>;

fn serve_echo(socket: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        tonic::transport::Server::builder()
            .add_service(FieldServiceServer::new(Echo).max_decoding_message_size(64 << 20))
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never listened",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CPU seconds (user + system) a process has used so far, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name is in parentheses and may contain spaces: count fields after it.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime (fields 14 and 15 of the line) in clock ticks of 1/100 s.
    (ticks(11) + ticks(12)) / 100.0
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    calls_per_s: f64,
    fields_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// Server CPU time (user + system) per field, µs.
    server_cpu_us_per_field: f64,
}

/// One kind of call the load generator makes; returns the fields it served.
trait Call: Send + Sync + 'static {
    fn call(&self, i: u64) -> impl std::future::Future<Output = usize> + Send;
}

/// One server under test: how to call it, and what its measured rounds added up to.
struct Target<C> {
    /// The server's pid, whose CPU time is charged to the calls.
    pid: u32,
    call: Arc<C>,
    latencies: Vec<Duration>,
    fields: usize,
    elapsed: Duration,
    cpu_seconds: f64,
}

impl<C: Call> Target<C> {
    fn new(pid: u32, call: C) -> Self {
        Self {
            pid,
            call: Arc::new(call),
            latencies: Vec::new(),
            fields: 0,
            elapsed: Duration::ZERO,
            cpu_seconds: 0.0,
        }
    }

    /// Runs the calls from `in_flight` tasks for `time`; returns latencies, fields, duration.
    async fn run(&self, in_flight: usize, time: Duration) -> (Vec<Duration>, usize, Duration) {
        let end = Instant::now() + time;
        let tasks: Vec<_> = (0..in_flight)
            .map(|t| {
                let call = Arc::clone(&self.call);
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut fields = 0usize;
                    let mut i = (t as u64) << 32;
                    while Instant::now() < end {
                        let start = Instant::now();
                        fields += call.call(i).await;
                        lat.push(start.elapsed());
                        i += 1;
                    }
                    (lat, fields)
                })
            })
            .collect();
        let started = Instant::now();
        let mut lat = Vec::new();
        let mut fields = 0;
        for t in tasks {
            let (l, f) = t.await.unwrap();
            lat.extend(l);
            fields += f;
        }
        (lat, fields, started.elapsed())
    }

    /// One measured round, added to the totals.
    async fn round(&mut self, in_flight: usize, time: Duration) {
        let cpu_before = cpu_seconds(self.pid);
        let (lat, fields, elapsed) = self.run(in_flight, time).await;
        self.cpu_seconds += cpu_seconds(self.pid) - cpu_before;
        self.latencies.extend(lat);
        self.fields += fields;
        self.elapsed += elapsed;
    }

    fn stats(mut self) -> Stats {
        let lat = &mut self.latencies;
        lat.sort_unstable();
        let pct = |p: f64| {
            let i = ((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1));
            lat.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
        };
        let secs = self.elapsed.as_secs_f64();
        Stats {
            calls_per_s: lat.len() as f64 / secs,
            fields_per_s: self.fields as f64 / secs,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            server_cpu_us_per_field: self.cpu_seconds * 1e6 / self.fields.max(1) as f64,
        }
    }
}

/// Measures the echo server and the daemon in alternating rounds: one second of warm-up
/// each, then `rounds` rounds of `seconds / rounds` on each, so that both see the same
/// machine conditions (this machine is shared and drifts). Returns (echo, daemon).
async fn compare<C: Call>(
    seconds: u64,
    rounds: u32,
    in_flight: usize,
    mut echo: Target<C>,
    mut daemon: Target<C>,
) -> (Stats, Stats) {
    echo.run(in_flight, Duration::from_secs(1)).await;
    daemon.run(in_flight, Duration::from_secs(1)).await;
    let rounds = rounds.max(1);
    let time = Duration::from_secs(seconds) / rounds;
    for _ in 0..rounds {
        echo.round(in_flight, time).await;
        daemon.round(in_flight, time).await;
    }
    (echo.stats(), daemon.stats())
}

fn ctx(record: u64) -> Option<pb::Context> {
    Some(pb::Context {
        tenant: "load".into(),
        field: "f".into(),
        record: Some(format!("r{record}")),
    })
}

/// Unary `Encrypt` of one 64-byte field per call.
struct Unary(FieldServiceClient<Channel>);

impl Call for Unary {
    async fn call(&self, i: u64) -> usize {
        self.0
            .clone()
            .encrypt(pb::EncryptRequest {
                context: ctx(i),
                plaintext: vec![7u8; 64],
            })
            .await
            .expect("encrypt");
        1
    }
}

/// `EncryptBatch` of the same fields (64 bytes each) per call.
struct Batch {
    client: FieldServiceClient<Channel>,
    /// Built once and cloned per call, so that the client's own work stays small next to
    /// the server's (client and server share the machine's cores).
    request: pb::EncryptBatchRequest,
}

impl Batch {
    fn new(client: FieldServiceClient<Channel>, size: usize) -> Self {
        let items = (0..size as u64)
            .map(|j| pb::EncryptRequest {
                context: ctx(j),
                plaintext: vec![7u8; 64],
            })
            .collect();
        Self {
            client,
            request: pb::EncryptBatchRequest { items },
        }
    }
}

impl Call for Batch {
    async fn call(&self, _: u64) -> usize {
        let r = self
            .client
            .clone()
            .encrypt_batch(self.request.clone())
            .await
            .expect("encrypt batch")
            .into_inner();
        let ok = r
            .results
            .iter()
            .filter(|r| matches!(r.result, Some(pb::encrypt_result::Result::Ok(_))))
            .count();
        assert_eq!(ok, self.request.items.len(), "every field encrypted");
        ok
    }
}

fn main() {
    let args = Args::parse();
    if let Some(socket) = &args.echo_server {
        serve_echo(socket);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let me = std::env::current_exe().unwrap();
    let phiseald = args
        .phiseald
        .clone()
        .unwrap_or_else(|| me.with_file_name("phiseald"));
    let daemon_socket = dir.path().join("run/phiseald.sock");
    let echo_socket = dir.path().join("echo.sock");
    let daemon = Proc(
        Command::new(&phiseald)
            .arg("--socket")
            .arg(&daemon_socket)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("PHISEALD_LIMITS__RATE_PER_SECOND", "10000000")
            .env("PHISEALD_LIMITS__RATE_BURST", "1000000")
            .env("PHISEALD_LIMITS__MAX_MESSAGE_BYTES", "67108864")
            .env("PHISEALD_LOG__LEVEL", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", phiseald.display())),
    );
    let echo = Proc(
        Command::new(&me)
            .arg("--echo-server")
            .arg(&echo_socket)
            .spawn()
            .unwrap(),
    );
    wait_socket(&daemon_socket);
    wait_socket(&echo_socket);
    let (daemon_pid, echo_pid) = (daemon.0.id(), echo.0.id());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let connect = |p: PathBuf| async move {
            FieldServiceClient::new(phiseal_proto::connect_unix(p).await.unwrap())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20)
        };
        let daemon = connect(daemon_socket.clone()).await;
        let echo = connect(echo_socket.clone()).await;
        pb::admin_service_client::AdminServiceClient::new(
            phiseal_proto::connect_unix(&daemon_socket).await.unwrap(),
        )
        .create_tenant(pb::CreateTenantRequest {
            tenant: "load".into(),
        })
        .await
        .unwrap();

        let s = args.seconds;
        let b = args.batch;
        println!(
            "| scenario | echo calls/s | echo p50 µs | echo p99 µs | phiseald calls/s | phiseald fields/s | phiseald p50 µs | phiseald p99 µs | p50 ratio | server CPU µs/field: echo → phiseald |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        let row = |name: &str, e: Stats, d: Stats| {
            println!(
                "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}× | {:.2} → {:.2} |",
                e.calls_per_s,
                e.p50_us,
                e.p99_us,
                d.calls_per_s,
                d.fields_per_s,
                d.p50_us,
                d.p99_us,
                d.p50_us / e.p50_us,
                e.server_cpu_us_per_field,
                d.server_cpu_us_per_field,
            );
        };
        let wanted = |name: &str| args.only.as_deref().is_none_or(|o| name.contains(o));
        for in_flight in [1, 64] {
            let name = format!("Encrypt 64 B, {in_flight} in flight");
            if wanted(&name) {
                let (e, d) = compare(
                    s,
                    args.rounds,
                    in_flight,
                    Target::new(echo_pid, Unary(echo.clone())),
                    Target::new(daemon_pid, Unary(daemon.clone())),
                )
                .await;
                row(&name, e, d);
            }
        }
        for &in_flight in &args.batch_in_flight {
            let name = format!("EncryptBatch {b} × 64 B, {in_flight} in flight");
            if wanted(&name) {
                let (e, d) = compare(
                    s,
                    args.rounds,
                    in_flight,
                    Target::new(echo_pid, Batch::new(echo.clone(), b)),
                    Target::new(daemon_pid, Batch::new(daemon.clone(), b)),
                )
                .await;
                row(&name, e, d);
            }
        }
    });
}
