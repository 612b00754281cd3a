//! The shared KMS conformance suite, on the local development KMS.
#![allow(clippy::unwrap_used)]

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_kms_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let kms = phiseal_kms_local::LocalKms::open(dir.path().join("root.key")).unwrap();
    phiseal::testkit::conformance::kms(std::sync::Arc::new(kms), true).await;
}
