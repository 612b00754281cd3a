//! Builds the configured KMS backend (`[kms]`): the local development KMS in the data
//! directory, AWS KMS, Azure Key Vault or a PKCS#11 HSM. Shared by the daemon and by the
//! offline root-key commands of the CLI (`phiseal root rotate` / `root migrate`).

use std::sync::Arc;

use phiseal::kms::{Kms, KmsChain};

use phiseal_kms_azure::{AzureCredentialConfig, AzureKeyVaultConfig, WrapAlgorithm};

use crate::config::{
    AzureAlgorithmName, AzureCredentialName, AzureKmsSection, Config, KmsConfig, KmsKind,
    Pkcs11KmsSection,
};
use crate::error::DaemonError;

/// Connects to the KMS that `config.kms` names, and to `[kms.previous]` if set (a root-key
/// migration in progress: the current backend wraps, either unwraps — see [`KmsChain`]).
/// Cloud and HSM backends check their key once (it exists, is enabled and may wrap and
/// unwrap), so a wrong key id fails here, at start, with an error naming the backend and the
/// cause.
pub async fn open_kms(config: &Config) -> Result<Arc<dyn Kms>, DaemonError> {
    open_kms_chain(&config.kms, &config.data_dir).await
}

/// [`open_kms`] for a `[kms]` section, with `data_dir` for the local KMS's `root.key`.
pub async fn open_kms_chain(
    kms: &KmsConfig,
    data_dir: &std::path::Path,
) -> Result<Arc<dyn Kms>, DaemonError> {
    let current = open_one(kms, data_dir).await?;
    match &kms.previous {
        None => Ok(current),
        Some(previous) => {
            let previous = open_one(previous, data_dir).await?;
            Ok(Arc::new(KmsChain::new(current, vec![previous])))
        }
    }
}

/// One backend: `kms` without its `previous`.
async fn open_one(
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
        KmsKind::Azure => {
            let azure = kms.azure.as_ref().ok_or_else(|| missing(KmsKind::Azure))?;
            let backend = phiseal_kms_azure::AzureKeyVaultKms::connect(&azure_config(azure))
                .await
                .map_err(backend_error)?;
            Ok(Arc::new(backend))
        }
        KmsKind::Pkcs11 => {
            let p = kms
                .pkcs11
                .as_ref()
                .ok_or_else(|| missing(KmsKind::Pkcs11))?;
            let backend = phiseal_kms_pkcs11::Pkcs11Kms::connect(&pkcs11_config(p))
                .await
                .map_err(backend_error)?;
            Ok(Arc::new(backend))
        }
    }
}

/// The PKCS#11 backend's settings from `[kms.pkcs11]`.
pub(crate) fn pkcs11_config(p: &Pkcs11KmsSection) -> phiseal_kms_pkcs11::Pkcs11Config {
    phiseal_kms_pkcs11::Pkcs11Config {
        module: p.module.clone(),
        token_label: p.token_label.clone(),
        pin: p.pin.0.clone().into(),
        key_label: p.key_label.clone(),
        previous_key_labels: p.previous_key_labels.clone(),
    }
}

/// The Azure backend's settings from `[kms.azure]` (validated: client-secret has its parts).
fn azure_config(a: &AzureKmsSection) -> AzureKeyVaultConfig {
    let credential = match a.credential {
        AzureCredentialName::ManagedIdentity => AzureCredentialConfig::ManagedIdentity {
            client_id: a.client_id.clone(),
        },
        AzureCredentialName::WorkloadIdentity => AzureCredentialConfig::WorkloadIdentity {
            tenant_id: a.tenant_id.clone(),
            client_id: a.client_id.clone(),
            token_file: None,
        },
        AzureCredentialName::ClientSecret => AzureCredentialConfig::ClientSecret {
            tenant_id: a.tenant_id.clone().unwrap_or_default(),
            client_id: a.client_id.clone().unwrap_or_default(),
            secret: a
                .client_secret
                .as_ref()
                .map(|s| s.0.clone())
                .unwrap_or_default()
                .into(),
        },
        AzureCredentialName::AzureCli => AzureCredentialConfig::AzureCli {
            tenant_id: a.tenant_id.clone(),
        },
        AzureCredentialName::DeveloperTools => AzureCredentialConfig::DeveloperTools,
    };
    AzureKeyVaultConfig {
        vault_url: a.vault_url.clone(),
        key_name: a.key_name.clone(),
        algorithm: match a.algorithm {
            AzureAlgorithmName::RsaOaep256 => WrapAlgorithm::RsaOaep256,
            AzureAlgorithmName::A256Kw => WrapAlgorithm::A256Kw,
        },
        credential,
    }
}
