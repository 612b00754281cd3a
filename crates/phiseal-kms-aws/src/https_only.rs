//! Every KMS request goes over https, or over plain http to a loopback address only.
//!
//! `Encrypt` requests and `Decrypt` responses carry tenant keys. SigV4 signs a request but
//! does not encrypt it, so a plain-http endpoint (an `endpoint_url` typo, a TLS-terminating
//! proxy, `AWS_ENDPOINT_URL_KMS` or a profile's `endpoint_url`) would put every tenant key on
//! the network in clear. The check runs on the URI each request is actually sent to, after
//! the SDK resolved the endpoint from all of those sources: an interceptor refuses the
//! request before it is transmitted. Plain http to `localhost`, `127.0.0.0/8` or `::1` stays
//! allowed: an emulator on the same machine (the tests' moto server).

use std::fmt;

use aws_sdk_kms::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_kms::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_kms::error::BoxError;

/// The interceptor that applies [`check`] to every request of the client it is added to.
#[derive(Debug)]
pub(crate) struct HttpsOnly;

impl Intercept for HttpsOnly {
    fn name(&self) -> &'static str {
        "phiseal-https-only"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        check(context.request().uri()).map_err(Into::into)
    }
}

/// A request refused because it would leave the machine without TLS.
#[derive(Debug)]
pub(crate) struct InsecureEndpoint {
    /// The scheme and host it would have gone to (no path or query).
    target: String,
}

impl fmt::Display for InsecureEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refusing to send a KMS request to '{}': tenant keys would cross the network \
             unencrypted (SigV4 signs requests, it does not encrypt them); use an https \
             endpoint (plain http is accepted only to localhost, 127.0.0.0/8 or ::1, for a \
             local emulator)",
            self.target
        )
    }
}

impl std::error::Error for InsecureEndpoint {}

/// `Ok` for an https URI, or an http one whose host is a loopback address.
pub(crate) fn check(uri: &str) -> Result<(), InsecureEndpoint> {
    let parsed = url::Url::parse(uri);
    if let Ok(url) = &parsed {
        match url.scheme() {
            "https" => return Ok(()),
            "http" if is_loopback(url) => return Ok(()),
            _ => {}
        }
    }
    let target = match &parsed {
        Ok(url) => format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default()),
        Err(_) => "an unparsable URI".to_owned(),
    };
    Err(InsecureEndpoint { target })
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn https_anywhere_and_http_only_to_loopback() {
        for ok in [
            "https://kms.eu-central-1.amazonaws.com/",
            "https://vpce-1.kms.eu-central-1.vpce.amazonaws.com",
            "HTTPS://kms.us-east-1.amazonaws.com/",
            "http://127.0.0.1:5000/",
            "http://127.1.2.3/",
            "http://localhost:4566/",
            "http://LOCALHOST/",
            "http://[::1]:5000/",
        ] {
            assert!(check(ok).is_ok(), "{ok}");
        }
        for refused in [
            "http://kms.eu-central-1.amazonaws.com/",
            "http://10.0.0.5:8080/",
            "http://kms-proxy.internal/",
            "http://127.0.0.1@evil.example/",
            "http://localhost.evil.example/",
            "http://[::ffff:127.0.0.1]/",
            "ftp://127.0.0.1/",
            "not a uri",
        ] {
            let err = check(refused).unwrap_err().to_string();
            assert!(err.contains("unencrypted"), "{refused}: {err}");
            assert!(!err.contains('@'), "no user info in the message: {err}");
        }
    }
}
