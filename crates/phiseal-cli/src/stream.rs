//! `encrypt-file` / `decrypt-file`: a file of any size through the daemon's streaming RPCs,
//! in constant memory. A reader thread sends the input in chunks (the channel is bounded, so
//! reading waits for the daemon); answers are appended to `OUTPUT.partial` (mode 0600), which
//! is fsynced and renamed to `OUTPUT` only when the call ends with OK. On any failure the
//! partial file is removed: a truncated or altered stream leaves no output behind.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use phiseal_proto::v1::{
    DecryptStreamRequest, EncryptStreamRequest, StreamEnd, decrypt_stream_request,
    encrypt_stream_request,
};
use serde_json::json;
use tokio::sync::mpsc;
use zeroize::Zeroize;

use crate::cli::{FileArgs, GlobalArgs};
use crate::client::{Daemon, status_error};
use crate::error::CliError;
use crate::output::report;
use crate::partial::Partial;

/// Bytes per request message.
const CHUNK: usize = 64 * 1024;
/// Request messages buffered ahead of the daemon.
const AHEAD: usize = 4;

/// The input reader thread: the bytes it read (all of the input), or why it stopped early.
type Reader = std::thread::JoinHandle<Result<u64, CliError>>;

/// The request messages of one streaming call.
struct Requests<M> {
    /// The first message (the context).
    first: M,
    /// A message carrying a chunk of the input.
    chunk: fn(Vec<u8>) -> M,
    /// The last message, made of the input's byte count once it has been read to its end
    /// (`EncryptStream`'s `end`); `None` where the requests just close.
    end: Option<fn(u64) -> M>,
}

/// Reads `input` in chunks on a thread, sending the messages of `requests`: the first before
/// any chunk, the end (if any) after the last, once the input has been read to its end. The chunks are moved into the
/// messages (the gRPC layer does not wipe its buffers). A read error is reported on `failed`
/// while the request stream is kept open — closing it would tell the daemon the input ended,
/// and it would seal a truncated stream — until the caller has cancelled the call and drops
/// `release`.
fn spawn_reader<M: Send + 'static>(
    input: &Path,
    requests: Requests<M>,
) -> Result<(mpsc::Receiver<M>, Reader, ReaderFailure), CliError> {
    let Requests {
        first,
        chunk: message,
        end,
    } = requests;
    let mut file =
        File::open(input).map_err(CliError::io(format!("opening {}", input.display())))?;
    let shown = input.display().to_string();
    let (tx, rx) = mpsc::channel(AHEAD);
    let (failed_tx, failed) = tokio::sync::oneshot::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let stopped =
        || CliError::Failed("the daemon stopped reading the input before its end".to_owned());
    let reader = std::thread::spawn(move || {
        let mut total = 0u64;
        if tx.blocking_send(first).is_err() {
            return Err(stopped());
        }
        loop {
            let mut chunk = vec![0u8; CHUNK];
            let n = match file.read(&mut chunk) {
                Ok(n) => n,
                Err(e) => {
                    let _ = failed_tx.send(CliError::Io {
                        what: format!("reading {shown}"),
                        source: e,
                    });
                    // Hold the request stream open until the call is cancelled.
                    let _ = released.recv();
                    drop(tx);
                    return Err(CliError::Failed(format!("reading {shown} failed")));
                }
            };
            if n == 0 {
                if let Some(end) = end
                    && tx.blocking_send(end(total)).is_err()
                {
                    return Err(stopped());
                }
                return Ok(total);
            }
            chunk.truncate(n);
            total += n as u64;
            if tx.blocking_send(message(chunk)).is_err() {
                return Err(stopped());
            }
        }
    });
    Ok((
        rx,
        reader,
        ReaderFailure {
            failed,
            _release: release,
        },
    ))
}

/// A read error from the reader thread, and the hold on its request stream.
struct ReaderFailure {
    failed: tokio::sync::oneshot::Receiver<CliError>,
    /// Dropping it lets a failed reader close the request stream.
    _release: std::sync::mpsc::Sender<()>,
}

/// Runs one streaming call: sends the file, writes the answers, commits on OK.
async fn run<M: Send + 'static>(
    what: &str,
    args: &FileArgs,
    global: &GlobalArgs,
    requests: Requests<M>,
    call: impl AsyncCall<M>,
    wipe_answers: bool,
) -> Result<(), CliError> {
    let daemon = Daemon::connect(global).await?;
    // From here on SIGINT/SIGTERM end the run through the normal path, so that the partial
    // output is removed (a SIGKILL cannot be caught: the `.partial` file then stays).
    let interrupt = crate::partial::interruption();
    tokio::pin!(interrupt);
    let stopped = || CliError::Failed(format!("{what}: interrupted; no output written"));
    let mut output = Partial::create(&args.output)?;
    let (rx, reader, mut failure) = spawn_reader(&args.input, requests)?;
    let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
    let started = tokio::select! {
        started = call.call(&daemon, requests) => started,
        () = &mut interrupt => return Err(stopped()),
    };
    let mut answers = started.map_err(|s| status_error(what, &s))?.into_inner();
    let mut written = 0u64;
    let mut watching = true;
    loop {
        tokio::select! {
            answer = answers.message() => match answer {
                Ok(Some(mut chunk)) => {
                    output.append(&chunk.chunk)?;
                    written += chunk.chunk.len() as u64;
                    if wipe_answers {
                        chunk.chunk.zeroize();
                    }
                }
                Ok(None) => break,
                Err(status) => return Err(status_error(what, &status)),
            },
            () = &mut interrupt => return Err(stopped()),
            failed = &mut failure.failed, if watching => match failed {
                Ok(error) => {
                    // Cancel the call (the daemon records the stream as failed), then let the
                    // reader go.
                    drop(answers);
                    drop(failure);
                    let _ = reader.join();
                    return Err(error);
                }
                // The reader finished without a read error.
                Err(_) => watching = false,
            },
        }
    }
    drop(failure);
    let read = reader
        .join()
        .map_err(|_| CliError::Failed(format!("{what}: the input reader failed")))??;
    output.commit()?;
    report(
        global.json,
        &json!({ "input_bytes": read, "output_bytes": written, "output": args.output.display().to_string() }),
        &format!(
            "{what}: {read} bytes in, {written} bytes written to {}",
            args.output.display()
        ),
    )
}

/// A streaming RPC of the field client.
trait AsyncCall<M> {
    /// Starts the call with `requests`.
    async fn call(
        self,
        daemon: &Daemon,
        requests: tokio_stream::wrappers::ReceiverStream<M>,
    ) -> Result<tonic::Response<tonic::Streaming<phiseal_proto::v1::StreamChunk>>, tonic::Status>;
}

struct Encrypt;
struct Decrypt;

impl AsyncCall<EncryptStreamRequest> for Encrypt {
    async fn call(
        self,
        daemon: &Daemon,
        requests: tokio_stream::wrappers::ReceiverStream<EncryptStreamRequest>,
    ) -> Result<tonic::Response<tonic::Streaming<phiseal_proto::v1::StreamChunk>>, tonic::Status>
    {
        daemon.streaming().encrypt_stream(requests).await
    }
}

impl AsyncCall<DecryptStreamRequest> for Decrypt {
    async fn call(
        self,
        daemon: &Daemon,
        requests: tokio_stream::wrappers::ReceiverStream<DecryptStreamRequest>,
    ) -> Result<tonic::Response<tonic::Streaming<phiseal_proto::v1::StreamChunk>>, tonic::Status>
    {
        daemon.streaming().decrypt_stream(requests).await
    }
}

/// `encrypt-file`.
pub(crate) async fn encrypt_file(args: FileArgs, global: &GlobalArgs) -> Result<(), CliError> {
    let requests = Requests {
        first: EncryptStreamRequest {
            part: Some(encrypt_stream_request::Part::Context(args.field.context())),
        },
        chunk: |bytes| EncryptStreamRequest {
            part: Some(encrypt_stream_request::Part::Chunk(bytes)),
        },
        end: Some(|plaintext_bytes| EncryptStreamRequest {
            part: Some(encrypt_stream_request::Part::End(StreamEnd {
                plaintext_bytes,
            })),
        }),
    };
    run("encrypt-file", &args, global, requests, Encrypt, false).await
}

/// `decrypt-file`.
pub(crate) async fn decrypt_file(args: FileArgs, global: &GlobalArgs) -> Result<(), CliError> {
    let requests = Requests {
        first: DecryptStreamRequest {
            part: Some(decrypt_stream_request::Part::Context(args.field.context())),
        },
        chunk: |bytes| DecryptStreamRequest {
            part: Some(decrypt_stream_request::Part::Chunk(bytes)),
        },
        end: None,
    };
    run("decrypt-file", &args, global, requests, Decrypt, true).await
}
