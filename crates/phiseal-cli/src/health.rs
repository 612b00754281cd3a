//! `health`: whether the daemon answers and serves the data plane (for scripts, start-up
//! waits and container health checks). Calls the standard `grpc.health.v1` service only: no
//! identity needed beyond reaching the socket, nothing audited.

use serde_json::json;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::cli::GlobalArgs;
use crate::client::Daemon;
use crate::error::CliError;
use crate::output::report;

/// The service whose status is asked: the data plane.
const SERVICE: &str = "phiseal.v1.FieldService";

/// Exit 0 if the daemon serves [`SERVICE`]; 5 for every failure (it cannot be reached, may
/// not be reached by this user, does not serve it, or the token settings cannot be read):
/// probes test for exactly that.
pub(crate) async fn health(global: &GlobalArgs) -> Result<(), CliError> {
    check(global).await.map_err(|e| match e {
        CliError::Status {
            code: tonic::Code::Unavailable,
            ..
        } => e,
        other => CliError::Status {
            what: "check the daemon's health".to_owned(),
            code: tonic::Code::Unavailable,
            kind: other.kind().to_owned(),
            message: other.to_string(),
        },
    })
}

async fn check(global: &GlobalArgs) -> Result<(), CliError> {
    let daemon = Daemon::connect(global).await?;
    let request = HealthCheckRequest {
        service: SERVICE.to_owned(),
    };
    let answer = daemon
        .call("check the daemon's health", daemon.health().check(request))
        .await?;
    if answer.status != ServingStatus::Serving as i32 {
        return Err(CliError::Status {
            what: "check the daemon's health".to_owned(),
            code: tonic::Code::Unavailable,
            kind: "not_serving".to_owned(),
            message: format!("phiseald answers but does not serve {SERVICE}"),
        });
    }
    report(
        global.json,
        &json!({ "serving": true, "socket": global.socket.display().to_string() }),
        &format!("phiseald at {} is serving", global.socket.display()),
    )
}
