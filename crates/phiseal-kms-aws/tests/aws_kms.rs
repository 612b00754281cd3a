//! `AwsKms` against a real moto KMS server, driven by the real AWS SDK.
//!
//! Every test starts its own `moto_server` (the executable named by `PHISEAL_MOTO_SERVER`) on
//! a free port of 127.0.0.1 and stops it when the test ends, panicking tests included (the
//! guard's `Drop` runs during unwinding). A test process killed by a signal can leave its moto
//! behind. If `PHISEAL_MOTO_SERVER` is unset the tests fail: they never skip.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use phiseal::context::TenantId;
use phiseal::kms::{KeyBinding, Kms};
use phiseal::testkit::conformance;
use phiseal::{BackendErrorKind, TenantKey};
use phiseal_kms_aws::testkit::{Moto, client, create_key};
use phiseal_kms_aws::{AwsKms, AwsKmsConfig};

fn binding(tenant: &str, version: u32) -> KeyBinding {
    KeyBinding {
        tenant: TenantId::new(tenant).unwrap(),
        version,
    }
}

#[tokio::test]
async fn conformance_suite() {
    let moto = Moto::start();
    let client = client(&moto.url()).await;
    let arn = create_key(&client).await;
    let kms = AwsKms::from_client(client, &arn).await.unwrap();
    conformance::kms(Arc::new(kms), true).await;
}

#[tokio::test]
async fn root_key_ref_records_the_key_arn_also_via_alias() {
    let moto = Moto::start();
    let client = client(&moto.url()).await;
    let arn = create_key(&client).await;
    assert!(
        arn.starts_with("arn:aws:kms:us-east-1:123456789012:key/"),
        "{arn}"
    );
    client
        .create_alias()
        .alias_name("alias/phiseal-test")
        .target_key_id(&arn)
        .send()
        .await
        .unwrap();
    let key_id = arn.rsplit('/').next().unwrap().to_owned();
    for configured in [arn.as_str(), key_id.as_str(), "alias/phiseal-test"] {
        let kms = AwsKms::from_client(client.clone(), configured)
            .await
            .unwrap();
        assert_eq!(kms.name(), "aws-kms");
        assert_eq!(kms.key_arn(), arn);
        let key = TenantKey::from_bytes([7; 32]);
        let b = binding("acme", 1);
        let wrapped = kms.wrap(&key, &b).await.unwrap();
        assert_eq!(
            wrapped.root_key_ref,
            format!("aws-kms:{arn}"),
            "{configured}"
        );
        let back = kms.unwrap(&wrapped, &b).await.unwrap();
        assert_eq!(back.expose(), key.expose());
    }
}

#[tokio::test]
async fn a_wrap_under_one_key_does_not_unwrap_with_another_keys_config() {
    let moto = Moto::start();
    let client = client(&moto.url()).await;
    let arn_a = create_key(&client).await;
    let arn_b = create_key(&client).await;
    let kms_a = AwsKms::from_client(client.clone(), &arn_a).await.unwrap();
    let kms_b = AwsKms::from_client(client.clone(), &arn_b).await.unwrap();
    let key = TenantKey::from_bytes([9; 32]);
    let b = binding("acme", 2);
    let wrapped = kms_a.wrap(&key, &b).await.unwrap();

    // Refused by reference, before any KMS call.
    let err = kms_b.unwrap(&wrapped, &b).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains(&arn_a), "{err}");
    assert!(err.to_string().contains(&arn_b), "{err}");

    // A record relabelled to name key B reaches KMS, which refuses to decrypt A's ciphertext
    // with key B (moto: AccessDeniedException; AWS: IncorrectKeyException).
    let mut relabelled = wrapped.clone();
    relabelled.root_key_ref = format!("aws-kms:{arn_b}");
    let err = kms_b.unwrap(&relabelled, &b).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains("aws-kms: Decrypt"), "{err}");

    // Still fine under its own key.
    assert_eq!(
        kms_a.unwrap(&wrapped, &b).await.unwrap().expose(),
        key.expose()
    );
}

#[tokio::test]
async fn unknown_key_is_misconfigured() {
    let moto = Moto::start();
    let client = client(&moto.url()).await;
    let err = AwsKms::from_client(client, "alias/does-not-exist")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{err}");
    assert!(err.to_string().contains("aws-kms"), "{err}");
    assert!(err.to_string().contains("alias/does-not-exist"), "{err}");
}

#[tokio::test]
async fn a_rejected_tls_certificate_is_misconfigured_not_an_outage() {
    // An endpoint whose certificate is not trusted (a wrong endpoint, a TLS-intercepting
    // proxy): a configuration problem that stale keys must not bridge.
    let moto = Moto::start_tls();
    let err = AwsKms::from_client(client(&moto.url()).await, "alias/phiseal")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{err}");
    assert!(
        err.to_string()
            .contains("the KMS endpoint's TLS certificate was rejected"),
        "{err}"
    );
}

#[tokio::test]
async fn empty_config_is_refused_without_network() {
    let config = AwsKmsConfig {
        key_id: String::new(),
        region: "us-east-1".into(),
        endpoint_url: Some("http://127.0.0.1:9".into()),
    };
    let err = AwsKms::connect(&config).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{err}");
}

#[tokio::test]
async fn outage_is_unavailable_and_a_restarted_server_serves_again() {
    let mut moto = Moto::start();
    let url = moto.url();
    let client = client(&url).await;
    let arn = create_key(&client).await;
    let kms = AwsKms::from_client(client.clone(), &arn).await.unwrap();
    let key = TenantKey::from_bytes([3; 32]);
    let b = binding("acme", 1);
    let wrapped = kms.wrap(&key, &b).await.unwrap();

    moto.stop();
    let started = Instant::now();
    let err = kms.wrap(&key, &b).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");
    let err = kms.unwrap(&wrapped, &b).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");
    let shown = err.to_string();
    assert!(shown.starts_with("aws-kms: Decrypt"), "{shown}");
    assert!(shown.contains(&arn), "{shown}");
    assert!(shown.contains("could not connect"), "{shown}");
    // Retries are bounded by the operation timeout (5 s per call).
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );

    // moto keeps its state in memory: the restarted server has no keys. The old instance's
    // key is gone (a configuration problem, not an outage); a new key works.
    let moto = Moto::start_on(moto.port);
    assert_eq!(moto.url(), url);
    let err = kms.wrap(&key, &b).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{err}");
    let arn2 = create_key(&client).await;
    let kms2 = AwsKms::from_client(client, &arn2).await.unwrap();
    let wrapped2 = kms2.wrap(&key, &b).await.unwrap();
    assert_eq!(
        kms2.unwrap(&wrapped2, &b).await.unwrap().expose(),
        key.expose()
    );
}

#[tokio::test]
async fn a_hung_kms_times_out_as_unavailable_and_serves_again_when_it_continues() {
    let moto = Moto::start();
    let client = client(&moto.url()).await;
    let arn = create_key(&client).await;
    let kms = AwsKms::from_client(client, &arn).await.unwrap();
    let key = TenantKey::from_bytes([4; 32]);
    let b = binding("acme", 1);
    let wrapped = kms.wrap(&key, &b).await.unwrap();

    moto.suspend();
    let started = Instant::now();
    let err = kms.unwrap(&wrapped, &b).await.unwrap_err();
    let waited = started.elapsed();
    moto.resume();
    assert_eq!(err.kind(), BackendErrorKind::Unavailable, "{err}");
    assert!(err.to_string().starts_with("aws-kms: Decrypt"), "{err}");
    // The operation timeout bounds the wait, retries included.
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    assert_eq!(
        kms.unwrap(&wrapped, &b).await.unwrap().expose(),
        key.expose()
    );
}

/// A credentials provider that always fails with the error `failure` makes (a test double:
/// moto has no STS role to refuse). No request reaches the endpoint.
#[derive(Debug)]
struct FailingCredentials(fn() -> aws_credential_types::provider::error::CredentialsError);

impl aws_credential_types::provider::ProvideCredentials for FailingCredentials {
    fn provide_credentials<'a>(
        &'a self,
    ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        aws_credential_types::provider::future::ProvideCredentials::ready(Err((self.0)()))
    }
}

/// The kind of error the backend reports when obtaining credentials fails so — the same
/// through `from_client` (the provider as given) and `from_sdk_config` (the path `connect`
/// takes: the provider's refresh runs detached, and its error reaches the call as a copy).
async fn kind_when_credentials_fail(
    failure: fn() -> aws_credential_types::provider::error::CredentialsError,
) -> BackendErrorKind {
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url("http://127.0.0.1:9")
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(FailingCredentials(failure))
        .load()
        .await;
    let arn = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000";
    let direct = AwsKms::from_client(aws_sdk_kms::Client::new(&conf), arn)
        .await
        .unwrap_err();
    let detached = AwsKms::from_sdk_config(&conf, arn).await.unwrap_err();
    for err in [&direct, &detached] {
        assert!(err.to_string().contains("aws-kms"), "{err}");
    }
    assert_eq!(direct.kind(), detached.kind(), "{direct} / {detached}");
    direct.kind()
}

#[tokio::test]
async fn a_plain_http_endpoint_off_this_machine_is_refused_before_anything_is_sent() {
    // Hosts off this machine that answer nothing (a name that does not resolve, an address
    // reserved for documentation): a request that were sent would fail as a connection
    // error (Unavailable) after the connect timeout, not as this immediate refusal.
    for endpoint in ["http://kms-proxy.invalid:8080", "http://192.0.2.1:9"] {
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_credential_types::Credentials::new(
                "AKIDEXAMPLE",
                "not-a-secret",
                None,
                None,
                "test",
            ))
            .load()
            .await;
        let started = std::time::Instant::now();
        let err = AwsKms::from_client(
            aws_sdk_kms::Client::new(&conf),
            "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000",
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{err}");
        let message = err.to_string();
        assert!(message.contains("unencrypted"), "{message}");
        // Refused at once: no connection attempt (192.0.2.1 would take the connect timeout).
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "{message}"
        );
    }
}

#[tokio::test]
async fn credential_failures_are_refusals_or_outages_as_they_are() {
    use aws_credential_types::provider::error::CredentialsError;
    // A refused role, token or key is a refusal: never served from stale keys.
    assert_eq!(
        kind_when_credentials_fail(|| CredentialsError::provider_error(
            "AccessDenied: not trusted"
        ))
        .await,
        BackendErrorKind::Denied
    );
    // A provider that cannot be reached, or times out, is an outage.
    assert_eq!(
        kind_when_credentials_fail(|| CredentialsError::provider_error(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "sts unreachable"
        )))
        .await,
        BackendErrorKind::Unavailable
    );
    assert_eq!(
        kind_when_credentials_fail(|| CredentialsError::provider_timed_out(Duration::from_secs(5)))
            .await,
        BackendErrorKind::Unavailable
    );
    // A web-identity token file that is missing or not readable: configuration, not an
    // outage that stale keys would bridge.
    let unreadable: [fn() -> CredentialsError; 2] = [
        || {
            CredentialsError::provider_error(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "AWS_WEB_IDENTITY_TOKEN_FILE",
            ))
        },
        || {
            CredentialsError::provider_error(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "AWS_WEB_IDENTITY_TOKEN_FILE",
            ))
        },
    ];
    for failure in unreadable {
        assert_eq!(
            kind_when_credentials_fail(failure).await,
            BackendErrorKind::Misconfigured
        );
    }
    // No credentials at all: a configuration problem.
    assert_eq!(
        kind_when_credentials_fail(|| CredentialsError::not_loaded("none in the chain")).await,
        BackendErrorKind::Misconfigured
    );
}

/// A stand-in for the EC2 instance-metadata service (no emulator of it installs here): hands
/// out a session token, then answers the credentials request with `status`. One request per
/// connection (`Connection: close`).
async fn instance_metadata_answering(status: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = if request.starts_with(b"PUT /latest/api/token") {
                    "HTTP/1.1 200 OK\r\nx-aws-ec2-metadata-token-ttl-seconds: 21600\r\n\
                     Content-Length: 5\r\nConnection: close\r\n\r\ntoken"
                        .to_owned()
                } else {
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                };
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    url
}

#[tokio::test]
async fn an_instance_metadata_service_answering_503_is_an_outage() {
    for (status, expected) in [
        ("503 Service Unavailable", BackendErrorKind::Unavailable),
        ("403 Forbidden", BackendErrorKind::Denied),
    ] {
        let endpoint = instance_metadata_answering(status).await;
        let imds = aws_config::imds::Client::builder()
            .endpoint(&endpoint)
            .unwrap()
            .max_attempts(1)
            .build();
        let provider = aws_config::imds::credentials::ImdsCredentialsProvider::builder()
            .imds_client(imds)
            .build();
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url("http://127.0.0.1:9")
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(provider)
            .load()
            .await;
        let err = AwsKms::from_client(
            aws_sdk_kms::Client::new(&conf),
            "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000",
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), expected, "{status}: {err}");
    }
}

/// The error a web-identity (IRSA) refresh fails with when STS answers `status` with `code`:
/// the SDK's own types, as `aws-config` wraps them.
fn sts_answer(code: &str, status: u16) -> aws_credential_types::provider::error::CredentialsError {
    use aws_sdk_sts::operation::assume_role_with_web_identity::AssumeRoleWithWebIdentityError;
    let error = AssumeRoleWithWebIdentityError::generic(
        aws_sdk_sts::error::ErrorMetadata::builder()
            .code(code)
            .message("from the test")
            .build(),
    );
    let raw = aws_sdk_sts::config::http::HttpResponse::new(
        aws_smithy_runtime_api::http::StatusCode::try_from(status).unwrap(),
        aws_smithy_types::body::SdkBody::empty(),
    );
    aws_credential_types::provider::error::CredentialsError::provider_error(
        aws_sdk_sts::error::SdkError::service_error(error, raw),
    )
}

#[tokio::test]
async fn a_throttled_or_failing_credentials_refresh_is_an_outage_a_refused_one_is_not() {
    use aws_credential_types::provider::error::CredentialsError;
    use aws_sdk_sts::error::{ConnectorError, SdkError};
    use aws_sdk_sts::operation::assume_role_with_web_identity::AssumeRoleWithWebIdentityError;
    type StsError = SdkError<AssumeRoleWithWebIdentityError>;
    let cases: [(fn() -> CredentialsError, BackendErrorKind); 11] = [
        // STS (web identity / IRSA) throttles, fails inside, cannot reach the issuer, or
        // answers 5xx: later.
        (
            || sts_answer("Throttling", 400),
            BackendErrorKind::Unavailable,
        ),
        (
            || sts_answer("InternalFailure", 500),
            BackendErrorKind::Unavailable,
        ),
        (
            || sts_answer("IDPCommunicationError", 400),
            BackendErrorKind::Unavailable,
        ),
        (|| sts_answer("", 503), BackendErrorKind::Unavailable),
        (
            || CredentialsError::provider_error(StsError::timeout_error("attempt timed out")),
            BackendErrorKind::Unavailable,
        ),
        (
            || {
                CredentialsError::provider_error(StsError::dispatch_failure(ConnectorError::io(
                    "connection refused".into(),
                )))
            },
            BackendErrorKind::Unavailable,
        ),
        // STS refuses the role or the token: a refusal.
        (|| sts_answer("AccessDenied", 403), BackendErrorKind::Denied),
        (
            || sts_answer("InvalidIdentityToken", 400),
            BackendErrorKind::Denied,
        ),
        // The ECS / EKS Pod Identity agent answers 503, or 403.
        (
            || {
                CredentialsError::provider_error(
                    "Non-success status from HTTP credential provider: 503",
                )
            },
            BackendErrorKind::Unavailable,
        ),
        (
            || {
                CredentialsError::provider_error(
                    "Non-success status from HTTP credential provider: 403",
                )
            },
            BackendErrorKind::Denied,
        ),
        // The agent cannot be reached (the SDK reports it as "unhandled").
        (
            || {
                CredentialsError::unhandled(StsError::dispatch_failure(ConnectorError::timeout(
                    "connect timed out".into(),
                )))
            },
            BackendErrorKind::Unavailable,
        ),
    ];
    for (i, (failure, expected)) in cases.into_iter().enumerate() {
        assert_eq!(
            kind_when_credentials_fail(failure).await,
            expected,
            "case {i}"
        );
    }
}

/// Credentials that take `delay` to load (a slow STS), counting the loads started.
#[derive(Debug)]
struct SlowCredentials {
    delay: Duration,
    loads: Arc<std::sync::atomic::AtomicUsize>,
}

impl aws_credential_types::provider::ProvideCredentials for SlowCredentials {
    fn provide_credentials<'a>(
        &'a self,
    ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        aws_credential_types::provider::future::ProvideCredentials::new(async move {
            self.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            Ok(aws_credential_types::Credentials::new(
                "testing",
                "testing",
                None,
                None,
                "slow-test",
            ))
        })
    }
}

#[tokio::test]
async fn a_credentials_refresh_slower_than_one_attempt_is_not_cancelled_by_it() {
    // 3 s to load credentials: longer than one attempt (2 s), shorter than the call (5 s).
    // The first attempt times out while waiting; the next one waits for the same refresh
    // instead of starting it again (which would time out again, every attempt).
    let moto = Moto::start();
    let arn = create_key(&client(&moto.url()).await).await;
    let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sdk_config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(moto.url())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(SlowCredentials {
            delay: Duration::from_secs(3),
            loads: Arc::clone(&loads),
        })
        .load()
        .await;
    let kms = AwsKms::from_sdk_config(&sdk_config, &arn).await;
    assert!(kms.is_ok(), "{kms:?}");
    assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 1);
}
