//! Builds the configured KMS backend (`[kms]`): the local development KMS in the data
//! directory, AWS KMS, Azure Key Vault or a PKCS#11 HSM. Shared by the daemon and by the
//! offline root-key commands of the CLI (`phiseal root rotate` / `root migrate`).

use std::sync::Arc;

use phiseal::kms::Kms;

use crate::config::{Config, KmsConfig, KmsKind};
use crate::error::DaemonError;

/// Connects to the KMS that `config.kms` names. Cloud and HSM backends check their key once
/// (it exists, is enabled and may wrap and unwrap), so a wrong key id fails here, at start,
/// with an error naming the backend and the cause.
pub async fn open_kms(config: &Config) -> Result<Arc<dyn Kms>, DaemonError> {
    open_kms_from(&config.kms, &config.data_dir).await
}

/// [`open_kms`] for a `[kms]` section, with `data_dir` for the local KMS's `root.key`.
pub async fn open_kms_from(
    kms: &KmsConfig,
    data_dir: &std::path::Path,
) -> Result<Arc<dyn Kms>, DaemonError> {
    kms.validate().map_err(DaemonError::Config)?;
    let backend_error = |source| DaemonError::Kms {
        kind: kms.kind.as_str(),
        source,
    };
    let missing = |kind: KmsKind| {
        DaemonError::Config(format!(
            "kms.{0}: required with kms.kind = \"{0}\"",
            kind.as_str()
        ))
    };
    match kms.kind {
        KmsKind::Local => Ok(phiseal_embedded::open_local_kms(data_dir)?),
        KmsKind::Aws => {
            let aws = kms.aws.as_ref().ok_or_else(|| missing(KmsKind::Aws))?;
            let config = phiseal_kms_aws::AwsKmsConfig {
                key_id: aws.key_id.clone(),
                region: aws.region.clone(),
                endpoint_url: aws.endpoint_url.clone(),
            };
            let backend = phiseal_kms_aws::AwsKms::connect(&config)
                .await
                .map_err(backend_error)?;
            Ok(Arc::new(backend))
        }
        KmsKind::Azure => Err(DaemonError::Config(
            "kms.kind = \"azure\": not wired yet".into(),
        )),
        KmsKind::Pkcs11 => Err(DaemonError::Config(
            "kms.kind = \"pkcs11\": not wired yet".into(),
        )),
    }
}
