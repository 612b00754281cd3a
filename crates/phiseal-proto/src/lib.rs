//! The sidecar's gRPC contract, `phiseal.v1` (see `proto/phiseal/v1/phiseal.proto`), generated
//! from the `.proto` file at build time, and [`connect_unix`] for clients on the same host.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::path::{Path, PathBuf};

pub mod codec;

/// `phiseal.v1`: messages, the `FieldService` and `AdminService` clients and servers.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("phiseal.v1");
}

/// The metadata key carrying an error's stable kind (`decryption_failed`, `key_destroyed`, …).
pub const ERROR_KIND_HEADER: &str = "phiseal-error-kind";

/// The metadata key carrying the request id the daemon used in its audit records (sent back
/// on every response; a client may set it on the request).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Connects a gRPC channel to a daemon listening on the Unix socket `path`. The channel
/// reconnects by itself if the daemon restarts.
pub async fn connect_unix(
    path: impl AsRef<Path>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path: PathBuf = path.as_ref().to_owned();
    // The URI is required by the API but not used: every connection goes to `path`.
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}
