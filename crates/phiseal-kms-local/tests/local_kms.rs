//! Behaviour of the local development KMS: file handling, wrapping, binding, redaction.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::fs;
use std::os::unix::fs::PermissionsExt;

use phiseal::context::TenantId;
use phiseal::kms::{KeyBinding, Kms, WrappedKey};
use phiseal::{BackendErrorKind, TenantKey};
use phiseal_kms_local::{LocalKms, LocalKmsError, WRAPPED_LEN};

fn binding(tenant: &str, version: u32) -> KeyBinding {
    KeyBinding {
        tenant: TenantId::new(tenant).unwrap(),
        version,
    }
}

fn mode_of(path: &std::path::Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn creates_root_key_file_with_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root.key");
    let kms = LocalKms::open(&path).unwrap();
    assert_eq!(mode_of(&path), 0o600);
    assert_eq!(fs::read(&path).unwrap().len(), 32);
    assert_eq!(kms.name(), "local");
    assert!(kms.is_dev_only());
    assert!(kms.root_key_ref().starts_with("local:"));
    assert_eq!(kms.root_key_ref().len(), "local:".len() + 16);
    // No staging file is left behind.
    let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);
}

#[tokio::test]
async fn creates_in_a_subdirectory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested").join("root.key");
    fs::create_dir(dir.path().join("nested")).unwrap();
    LocalKms::open(&path).unwrap();
    assert_eq!(mode_of(&path), 0o600);
}

#[tokio::test]
async fn reopening_gives_same_key_and_unwraps_earlier_wraps() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root.key");
    let first = LocalKms::open(&path).unwrap();
    let key = TenantKey::generate().unwrap();
    let b = binding("acme", 3);
    let wrapped = first.wrap(&key, &b).await.unwrap();
    drop(first);

    let second = LocalKms::open(&path).unwrap();
    assert_eq!(wrapped.root_key_ref, second.root_key_ref());
    let back = second.unwrap(&wrapped, &b).await.unwrap();
    assert_eq!(back.expose(), key.expose());
}

#[tokio::test]
async fn refuses_group_or_world_accessible_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root.key");
    LocalKms::open(&path).unwrap();
    for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let err = LocalKms::open(&path).unwrap_err();
        assert!(
            matches!(err, LocalKmsError::InsecurePermissions { mode: m, .. } if m == mode),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
        assert!(msg.contains("chmod 600"), "{msg}");
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    LocalKms::open(&path).unwrap();
}

#[tokio::test]
async fn refuses_a_key_file_of_another_user() {
    // Another user could have put there a private 32-byte file holding a key they know.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root.key");
    LocalKms::open(&path).unwrap();
    let me = rustix::process::geteuid().as_raw();
    // Only root can give a file away; as another user the check is unreachable here.
    assert_eq!(me, 0, "this test needs root (CI runs as root)");
    std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
    let err = LocalKms::open(&path).unwrap_err();
    assert!(
        matches!(
            err,
            LocalKmsError::WrongOwner {
                owner: 65534,
                me: 0,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("uid 65534"), "{err}");
}

#[tokio::test]
async fn a_staging_link_left_by_a_crashed_creation_is_removed() {
    // A creation that crashed after linking the key into place kept a second name for it:
    // deleting root.key would not destroy the key.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root.key");
    LocalKms::open(&path).unwrap();
    let left = dir.path().join("root.key.tmp-0123456789abcdef");
    fs::hard_link(&path, &left).unwrap();
    // Someone else's file that merely looks like one is not the key: it stays.
    let other = dir.path().join("root.key.tmp-fedcba9876543210");
    fs::write(&other, [0u8; 32]).unwrap();
    LocalKms::open(&path).unwrap();
    assert!(!left.exists(), "the second name of the root key is gone");
    assert!(other.exists());
    assert!(path.exists());
}

#[tokio::test]
async fn refuses_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("root.key");
    LocalKms::open(&target).unwrap();
    let link = dir.path().join("link.key");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let err = LocalKms::open(&link).unwrap_err();
    assert!(
        matches!(err, LocalKmsError::NotRegularFile { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(link.to_str().unwrap()));

    // A dangling symlink is refused too, not followed to create a file elsewhere.
    let dangling = dir.path().join("dangling.key");
    std::os::unix::fs::symlink(dir.path().join("nowhere.key"), &dangling).unwrap();
    let err = LocalKms::open(&dangling).unwrap_err();
    assert!(
        matches!(err, LocalKmsError::NotRegularFile { .. }),
        "{err:?}"
    );
    assert!(!dir.path().join("nowhere.key").exists());
}

#[tokio::test]
async fn refuses_directory() {
    let dir = tempfile::tempdir().unwrap();
    let err = LocalKms::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, LocalKmsError::NotRegularFile { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn refuses_wrong_length_file() {
    let dir = tempfile::tempdir().unwrap();
    for len in [0usize, 16, 31, 33, 64] {
        let path = dir.path().join(format!("root-{len}.key"));
        fs::write(&path, vec![7u8; len]).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = LocalKms::open(&path).unwrap_err();
        assert!(
            matches!(err, LocalKmsError::WrongLength { len: l, .. } if l == len as u64),
            "{err:?}"
        );
    }
}

#[tokio::test]
async fn missing_directory_is_a_clear_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("root.key");
    let err = LocalKms::open(&path).unwrap_err();
    assert!(matches!(err, LocalKmsError::Io { .. }), "{err:?}");
    let backend: phiseal::BackendError = err.into();
    assert_eq!(backend.kind(), BackendErrorKind::Misconfigured);
    assert!(std::error::Error::source(&backend).is_some());
}

#[tokio::test]
async fn round_trip_and_wrapped_layout() {
    let dir = tempfile::tempdir().unwrap();
    let kms = LocalKms::open(dir.path().join("root.key")).unwrap();
    let key = TenantKey::generate().unwrap();
    let b = binding("tenant-1", 1);
    let w1 = kms.wrap(&key, &b).await.unwrap();
    let w2 = kms.wrap(&key, &b).await.unwrap();
    assert_eq!(w1.ciphertext.len(), WRAPPED_LEN);
    assert_eq!(WRAPPED_LEN, 60);
    assert_eq!(w1.root_key_ref, kms.root_key_ref());
    // Fresh nonce each time.
    assert_ne!(w1.ciphertext[..12], w2.ciphertext[..12]);
    assert_ne!(w1.ciphertext, w2.ciphertext);
    // The key bytes do not appear in the wrapped bytes.
    assert!(
        !w1.ciphertext
            .windows(32)
            .any(|w| w == key.expose().as_slice())
    );
    for w in [&w1, &w2] {
        let back = kms.unwrap(w, &b).await.unwrap();
        assert_eq!(back.expose(), key.expose());
    }
}

#[tokio::test]
async fn binding_to_other_tenant_or_version_fails() {
    let dir = tempfile::tempdir().unwrap();
    let kms = LocalKms::open(dir.path().join("root.key")).unwrap();
    let key = TenantKey::generate().unwrap();
    let wrapped = kms.wrap(&key, &binding("alpha", 2)).await.unwrap();
    for other in [binding("beta", 2), binding("alpha", 1), binding("alpha", 3)] {
        let err = kms.unwrap(&wrapped, &other).await.unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::InvalidData);
        let msg = err.to_string();
        assert!(msg.contains(other.tenant.as_str()), "{msg}");
        assert!(msg.contains(&format!("version {}", other.version)), "{msg}");
    }
}

#[tokio::test]
async fn another_root_key_cannot_unwrap() {
    let dir = tempfile::tempdir().unwrap();
    let a = LocalKms::open(dir.path().join("a.key")).unwrap();
    let b = LocalKms::open(dir.path().join("b.key")).unwrap();
    assert_ne!(a.root_key_ref(), b.root_key_ref());
    let key = TenantKey::generate().unwrap();
    let bind = binding("acme", 1);
    let wrapped = a.wrap(&key, &bind).await.unwrap();

    // As stored: the reference names a's key, so b refuses it and names both references.
    let err = b.unwrap(&wrapped, &bind).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidData);
    let msg = err.to_string();
    assert!(msg.contains(a.root_key_ref()), "{msg}");
    assert!(msg.contains(b.root_key_ref()), "{msg}");

    // Relabelled to b's reference: authentication fails.
    let forged = WrappedKey {
        root_key_ref: b.root_key_ref().to_owned(),
        ciphertext: wrapped.ciphertext.clone(),
    };
    let err = b.unwrap(&forged, &bind).await.unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidData);
    assert!(err.to_string().contains("was not made by this root key"));
}

#[tokio::test]
async fn flipped_bit_or_wrong_length_fails() {
    let dir = tempfile::tempdir().unwrap();
    let kms = LocalKms::open(dir.path().join("root.key")).unwrap();
    let key = TenantKey::generate().unwrap();
    let b = binding("acme", 1);
    let wrapped = kms.wrap(&key, &b).await.unwrap();
    for byte in 0..WRAPPED_LEN {
        for bit in [0u8, 7] {
            let mut bad = wrapped.clone();
            bad.ciphertext[byte] ^= 1 << bit;
            let err = kms.unwrap(&bad, &b).await.unwrap_err();
            assert_eq!(err.kind(), BackendErrorKind::InvalidData);
        }
    }
    for len in [0usize, 1, 12, 28, 59, 61, 120] {
        let mut bad = wrapped.clone();
        bad.ciphertext.resize(len, 0);
        let err = kms.unwrap(&bad, &b).await.unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::InvalidData);
        assert!(err.to_string().contains(&format!("{len} bytes")));
    }
}

#[tokio::test]
async fn debug_output_has_no_key_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root.key");
    let kms = LocalKms::open(&path).unwrap();
    let root = fs::read(&path).unwrap();
    let debug = format!("{kms:?} {kms:#?}");
    assert!(debug.contains("REDACTED"), "{debug}");
    assert!(debug.contains(kms.root_key_ref()), "{debug}");
    assert!(!debug.contains(&hex::encode(&root)));
    assert!(!debug.to_lowercase().contains(&hex::encode(&root[..8])));
    assert!(!debug.contains(&format!("{:?}", &root[..])));
    assert!(!debug.contains(format!("{:?}", &root[..4]).trim_end_matches(']')));
}

#[tokio::test]
async fn concurrent_first_open_agrees_on_one_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root.key");
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || LocalKms::open(&path).unwrap().root_key_ref().to_owned())
        })
        .collect();
    let refs: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(refs.windows(2).all(|w| w[0] == w[1]), "{refs:?}");
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}
