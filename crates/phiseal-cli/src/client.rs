//! The connection to `phiseald`: the socket, the service token, the deadline, and the one
//! mapping from a gRPC status to an exit code.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use phiseal_proto::v1::admin_service_client::AdminServiceClient;
use phiseal_proto::v1::field_service_client::FieldServiceClient;
use tonic::codegen::InterceptedService;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_health::pb::health_client::HealthClient;
use zeroize::Zeroizing;

use crate::cli::GlobalArgs;
use crate::error::{CliError, exit};
use crate::output::printable;

/// Environment variable holding the service token itself (when `--token-file` is not given).
pub(crate) const TOKEN_ENV: &str = "PHISEAL_TOKEN";

/// The longest token file read.
const MAX_TOKEN_FILE: u64 = 4096;

/// Responses up to this size are accepted (tonic's default is 4 MiB; a rewrap batch of long
/// ciphertexts can be larger).
const MAX_RESPONSE: usize = 256 * 1024 * 1024;

/// The transport of both clients: the channel plus [`CallPolicy`].
pub(crate) type Svc = InterceptedService<Channel, CallPolicy>;

/// Adds the deadline (`grpc-timeout`) and, if configured, the bearer token to every call.
#[derive(Clone)]
pub(crate) struct CallPolicy {
    /// `Bearer <token>`, marked sensitive (never shown by `Debug`).
    authorization: Option<AsciiMetadataValue>,
    /// The deadline of each call; `None` for streams, which the daemon limits per message.
    timeout: Option<Duration>,
}

impl Interceptor for CallPolicy {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(timeout) = self.timeout {
            request.set_timeout(timeout);
        }
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A connected daemon.
pub(crate) struct Daemon {
    health: HealthClient<Svc>,
    field: FieldServiceClient<Svc>,
    streaming: FieldServiceClient<Svc>,
    admin: AdminServiceClient<Svc>,
    timeout: Duration,
}

impl Daemon {
    /// Loads the token, connects to the socket (within the deadline) and builds the clients.
    pub(crate) async fn connect(global: &GlobalArgs) -> Result<Daemon, CliError> {
        let token = load_token(global.token_file.as_deref(), std::env::var_os(TOKEN_ENV))?;
        let authorization = token.as_deref().map(|t| bearer(t)).transpose()?;
        let timeout = Duration::from_secs(global.timeout);
        let channel = connect_socket(&global.socket, timeout).await?;
        let policy = CallPolicy {
            authorization,
            timeout: Some(timeout),
        };
        let untimed = CallPolicy {
            timeout: None,
            ..policy.clone()
        };
        Ok(Daemon {
            health: HealthClient::with_interceptor(channel.clone(), policy.clone()),
            field: FieldServiceClient::with_interceptor(channel.clone(), policy.clone())
                .max_decoding_message_size(MAX_RESPONSE),
            // Stream answers are at most the daemon's limits.max_message_bytes, which an
            // operator may raise above tonic's 4 MiB default.
            streaming: FieldServiceClient::with_interceptor(channel.clone(), untimed)
                .max_decoding_message_size(MAX_RESPONSE),
            admin: AdminServiceClient::with_interceptor(channel, policy)
                .max_decoding_message_size(MAX_RESPONSE),
            timeout,
        })
    }

    /// The data-plane client (a cheap clone sharing the connection).
    pub(crate) fn field(&self) -> FieldServiceClient<Svc> {
        self.field.clone()
    }

    /// The data-plane client for streaming calls: no overall deadline (a large file takes as
    /// long as it takes); the daemon limits the time between messages.
    pub(crate) fn streaming(&self) -> FieldServiceClient<Svc> {
        self.streaming.clone()
    }

    /// The standard gRPC health client (a cheap clone sharing the connection).
    pub(crate) fn health(&self) -> HealthClient<Svc> {
        self.health.clone()
    }

    /// The admin client (a cheap clone sharing the connection).
    pub(crate) fn admin(&self) -> AdminServiceClient<Svc> {
        self.admin.clone()
    }

    /// Awaits one call, also enforcing the deadline on this side; `what` names the operation
    /// in the error.
    pub(crate) async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, CliError> {
        let deadline_passed = || CliError::Status {
            what: what.to_owned(),
            code: Code::DeadlineExceeded,
            kind: code_name(Code::DeadlineExceeded).to_owned(),
            message: format!("no answer within {} s (--timeout)", self.timeout.as_secs()),
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            // tonic's own enforcement of the deadline reports CANCELLED.
            Ok(Err(status)) if is_client_timeout(&status) => Err(deadline_passed()),
            Ok(Err(status)) => Err(status_error(what, &status)),
            Err(_) => Err(deadline_passed()),
        }
    }
}

/// True if `status` is tonic's client-side deadline expiry (which it reports as CANCELLED).
fn is_client_timeout(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Connects to the daemon's socket, giving up after `timeout`.
async fn connect_socket(socket: &Path, timeout: Duration) -> Result<Channel, CliError> {
    let error = |detail: String| CliError::Connect {
        socket: socket.to_owned(),
        detail,
    };
    match tokio::time::timeout(timeout, phiseal_proto::connect_unix(socket)).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) if is_permission_denied(&e) => Err(CliError::ConnectDenied {
            socket: socket.to_owned(),
            detail: error_chain(&e),
        }),
        Ok(Err(e)) => Err(error(error_chain(&e))),
        Err(_) => Err(error(format!(
            "no connection within {} s",
            timeout.as_secs()
        ))),
    }
}

/// Whether `e` or one of its sources is an I/O error `PermissionDenied` (EACCES on connect:
/// the socket's mode or its directory's keeps this user out).
fn is_permission_denied(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(error) = current {
        if error
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
        {
            return true;
        }
        current = error.source();
    }
    false
}

/// `e` and its sources, joined with `: ` (a source whose text repeats the previous is skipped).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if parts.last().is_none_or(|last| !last.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    printable(&parts.join(": ")).into_owned()
}

/// The exit code for a gRPC status code: the one place where statuses become exit codes.
pub(crate) fn exit_code_for(code: Code) -> u8 {
    match code {
        Code::PermissionDenied | Code::Unauthenticated => exit::DENIED,
        Code::NotFound => exit::NOT_FOUND,
        // phiseald never answers UNKNOWN itself: it is the gRPC client's code for a
        // connection that broke mid-call (the daemon stopped or crashed).
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Unknown => {
            exit::UNAVAILABLE
        }
        Code::FailedPrecondition => exit::KEY_GONE,
        _ => exit::FAILURE,
    }
}

/// The error for a failed call: the daemon's kind (`phiseal-error-kind`) and message.
pub(crate) fn status_error(what: &str, status: &Status) -> CliError {
    let kind = status
        .metadata()
        .get(phiseal_proto::ERROR_KIND_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mut message = status.message().to_owned();
    if message.is_empty() {
        message = status.code().description().to_owned();
    }
    if let Some(source) = std::error::Error::source(status) {
        message = format!("{message}: {}", error_chain(source));
    }
    if kind == "batch_too_large" {
        message.push_str(" (rewrap: use a smaller --batch)");
    }
    if kind == "segment_too_large" {
        message.push_str(
            " (the daemon's limits.max_stream_segment_bytes, 1 MiB by default: an operator \
             raises it; encrypt-file writes 64 KiB segments)",
        );
    } else if status.code() == Code::OutOfRange {
        // Refused by the gRPC layer (either side) for its size.
        message.push_str(
            " (a message over the size limit: the daemon's limits.max_message_bytes, 4 MiB by \
             default; large documents go through encrypt-file / decrypt-file, long rewrap \
             lines through a smaller --max-call-bytes)",
        );
    }
    CliError::Status {
        what: what.to_owned(),
        code: status.code(),
        kind: error_kind(kind, status.code()),
        message: printable(&message).into_owned(),
    }
}

/// `kind` if it looks like a stable error kind (lowercase letters, digits, `_`), else the
/// name of `code`.
pub(crate) fn error_kind(kind: &str, code: Code) -> String {
    let valid = !kind.is_empty()
        && kind.len() <= 64
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        kind.to_owned()
    } else {
        code_name(code).to_owned()
    }
}

/// The lowercase name of a gRPC status code (`unavailable`, `not_found`, …).
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The service token: read from `file` if given, else taken from the environment value
/// `env` (if set and not empty). Surrounding whitespace is trimmed.
pub(crate) fn load_token(
    file: Option<&Path>,
    env: Option<OsString>,
) -> Result<Option<Zeroizing<String>>, CliError> {
    if let Some(path) = file {
        return read_token_file(path).map(Some);
    }
    let Some(value) = env else { return Ok(None) };
    let value = Zeroizing::new(
        value
            .into_string()
            .map_err(|_| CliError::Failed(format!("{TOKEN_ENV} is not valid UTF-8")))?,
    );
    if value.trim().is_empty() {
        return Ok(None);
    }
    check_token(value.trim(), TOKEN_ENV).map(Some)
}

/// Reads a token file, refusing one that group or others can access.
fn read_token_file(path: &Path) -> Result<Zeroizing<String>, CliError> {
    let shown = path.display();
    let file = File::open(path).map_err(CliError::io(format!("cannot open token file {shown}")))?;
    // The checks use the opened file itself, so the file cannot be swapped in between.
    let meta = file
        .metadata()
        .map_err(CliError::io(format!("cannot stat token file {shown}")))?;
    if !meta.is_file() {
        return Err(CliError::Failed(format!(
            "token file {shown} is not a regular file"
        )));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CliError::Failed(format!(
            "token file {shown} has mode {mode:04o}: a token file must not be accessible by \
             group or others; run `chmod 600 {shown}`"
        )));
    }
    let bytes = crate::wiped::read_to_end_wiped(&mut file.take(MAX_TOKEN_FILE + 1))
        .map_err(CliError::io(format!("cannot read token file {shown}")))?;
    if bytes.len() as u64 > MAX_TOKEN_FILE {
        return Err(CliError::Failed(format!(
            "token file {shown} is larger than {MAX_TOKEN_FILE} bytes: not a token file"
        )));
    }
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| CliError::Failed(format!("token file {shown} is not UTF-8 text")))?;
    check_token(text.trim(), &format!("token file {shown}"))
}

/// Checks that `token` can be sent in a header: not empty, visible ASCII only.
fn check_token(token: &str, source: &str) -> Result<Zeroizing<String>, CliError> {
    if token.is_empty() {
        return Err(CliError::Failed(format!("{source} is empty")));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CliError::Failed(format!(
            "{source} does not hold a valid token (only visible ASCII characters are allowed)"
        )));
    }
    Ok(Zeroizing::new(token.to_owned()))
}

/// The `authorization` metadata value for `token`, marked sensitive.
fn bearer(token: &str) -> Result<AsciiMetadataValue, CliError> {
    let text = Zeroizing::new(format!("Bearer {token}"));
    let mut value: AsciiMetadataValue = MetadataValue::try_from(text.as_str())
        .map_err(|_| CliError::Failed("the service token is not a valid header value".into()))?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use std::io::Write;

    use super::*;

    #[test]
    fn status_codes_map_to_exit_codes() {
        let cases = [
            (Code::PermissionDenied, 3),
            (Code::Unauthenticated, 3),
            (Code::NotFound, 4),
            (Code::Unavailable, 5),
            (Code::DeadlineExceeded, 5),
            (Code::ResourceExhausted, 5),
            (Code::FailedPrecondition, 6),
            (Code::InvalidArgument, 1),
            (Code::AlreadyExists, 1),
            (Code::Aborted, 1),
            (Code::DataLoss, 1),
            (Code::Internal, 1),
            (Code::Unknown, 5),
        ];
        for (code, want) in cases {
            assert_eq!(exit_code_for(code), want, "{code:?}");
        }
    }

    #[test]
    fn status_error_uses_kind_header_and_formats() {
        let mut status = Status::failed_precondition("tenant 'acme' was shredded");
        status.metadata_mut().insert(
            phiseal_proto::ERROR_KIND_HEADER,
            "key_destroyed".parse().unwrap(),
        );
        let err = status_error("decrypt", &status);
        assert_eq!(err.exit_code(), 6);
        assert_eq!(
            err.to_string(),
            "decrypt: tenant 'acme' was shredded (key_destroyed)"
        );
    }

    #[test]
    fn status_error_without_kind_uses_code_name_and_cleans_message() {
        let status = Status::unavailable("backend\x1b[31m down");
        let err = status_error("rotate", &status);
        assert_eq!(err.exit_code(), 5);
        assert_eq!(err.to_string(), "rotate: backend?[31m down (unavailable)");
        assert_eq!(error_kind("Bad Kind!", Code::NotFound), "not_found");
        assert_eq!(
            error_kind("tenant_not_found", Code::NotFound),
            "tenant_not_found"
        );
    }

    fn token_file(mode: u32, content: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(content.as_bytes()).unwrap();
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        file
    }

    #[test]
    fn token_file_is_read_and_trimmed() {
        let file = token_file(0o600, "  phst_abc\n");
        let token = load_token(Some(file.path()), None).unwrap().unwrap();
        assert_eq!(token.as_str(), "phst_abc");
        let file = token_file(0o400, "phst_abc");
        assert!(load_token(Some(file.path()), None).is_ok());
    }

    #[test]
    fn token_file_readable_by_others_is_refused() {
        for mode in [0o644, 0o640, 0o604, 0o660, 0o606, 0o620] {
            let file = token_file(mode, "phst_secret_value");
            let err = load_token(Some(file.path()), None).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("chmod 600"), "{text}");
            assert!(text.contains(&format!("{mode:04o}")), "{text}");
            assert!(!text.contains("phst_secret_value"));
            assert_eq!(err.exit_code(), 1);
        }
    }

    #[test]
    fn bad_token_contents_are_refused_without_echo() {
        for content in ["", "  \n", "phst_with space", "phst_\u{e9}"] {
            let file = token_file(0o600, content);
            let err = load_token(Some(file.path()), None).unwrap_err().to_string();
            assert!(!err.contains("phst_"), "{err}");
        }
        let file = token_file(0o600, &"a".repeat(5000));
        assert!(load_token(Some(file.path()), None).is_err());
    }

    #[test]
    fn token_from_env_when_no_file() {
        assert!(load_token(None, None).unwrap().is_none());
        assert!(load_token(None, Some(" ".into())).unwrap().is_none());
        let token = load_token(None, Some(" phst_x \n".into()))
            .unwrap()
            .unwrap();
        assert_eq!(token.as_str(), "phst_x");
        // The file wins over the environment.
        let file = token_file(0o600, "phst_file");
        let token = load_token(Some(file.path()), Some("phst_env".into()))
            .unwrap()
            .unwrap();
        assert_eq!(token.as_str(), "phst_file");
    }

    #[test]
    fn bearer_value_is_sensitive() {
        let value = bearer("phst_abc").unwrap();
        assert!(value.is_sensitive());
        assert_eq!(value.to_str().unwrap(), "Bearer phst_abc");
        assert!(!format!("{value:?}").contains("phst_abc"));
    }
}
